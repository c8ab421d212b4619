"""The KVM backend's pure parts: ABI numbers and layouts, state flattening, UART, boot tables, programs.

None of these needs /dev/kvm; the ABI is checked against the kernel headers
compiled with the system's gcc (skipped where gcc or linux/kvm.h is missing).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from checksum_ref import checksum_reference
from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.kvm import abi, structs
from vmigrate.machine.kvm.state import vcpu_description
from vmigrate.machine.kvm.uart import SERIAL, SerialSink, Uart16550
from vmigrate.machine.memory import RAMBlock
from vmigrate.machine.x86guest import boot, build
from vmigrate.machine.x86guest.programs import program_for
from vmigrate.migration.wire import vmstate
from vmigrate.migration.wire.buffer import Reader

IOCTLS = [name for name in dir(abi) if name.startswith("KVM_") and isinstance(getattr(abi, name), int)
          and (getattr(abi, name) >> 8) & 0xFF == abi.KVMIO]
STRUCTS = ["kvm_userspace_memory_region", "kvm_regs", "kvm_segment", "kvm_dtable", "kvm_sregs",
           "kvm_msr_entry", "kvm_msrs", "kvm_cpuid_entry2", "kvm_cpuid2", "kvm_lapic_state", "kvm_xsave",
           "kvm_xcrs", "kvm_debugregs", "kvm_vcpu_events", "kvm_mp_state", "kvm_clock_data", "kvm_irqchip",
           "kvm_pit_config", "kvm_pit_state2", "kvm_dirty_log", "kvm_clear_dirty_log", "kvm_dirty_gfn",
           "kvm_enable_cap"]


def decode(desc: vmstate.Description, body: bytes) -> dict:
    """Decode a section body as the stream decoder does: a footer byte follows it."""
    framed = body + b"\x7e"
    return vmstate.decode_state(desc, Reader(framed, 0, len(framed)), desc.version_id)


@pytest.fixture(scope="module")
def kernel_header_values(tmp_path_factory) -> dict[str, int]:
    """Every ioctl number and struct size above, as the C compiler sees linux/kvm.h."""
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or linux/kvm.h not installed")
    src = tmp_path_factory.mktemp("kvmh") / "values.c"
    lines = [f'printf("{n} %lu\\n", (unsigned long)({n}));' for n in IOCTLS]
    lines += [f'printf("sizeof_{s} %lu\\n", (unsigned long)sizeof(struct {s}));' for s in STRUCTS]
    src.write_text("#include <stdio.h>\n#include <linux/kvm.h>\nint main(void){\n" + "\n".join(lines)
                   + "\nreturn 0;}\n")
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True, timeout=60)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=10).stdout
    return {name: int(value) for name, value in (line.split() for line in out.splitlines())}


def test_ioctl_numbers_match_the_kernel_headers(kernel_header_values):
    assert len(IOCTLS) > 40
    wrong = {n: (hex(getattr(abi, n)), hex(kernel_header_values[n])) for n in IOCTLS
             if getattr(abi, n) != kernel_header_values[n]}
    assert not wrong
    # The trap: same number, different size, different ioctl.
    assert abi.KVM_GET_PIT2 & 0xFF == abi.KVM_GET_VCPU_EVENTS & 0xFF == 0x9F
    assert abi.KVM_GET_PIT2 != abi.KVM_GET_VCPU_EVENTS


def test_struct_layouts_match_the_kernel_headers(kernel_header_values):
    wrong = {s: (ctypes.sizeof(getattr(abi, s)), kernel_header_values[f"sizeof_{s}"]) for s in STRUCTS
             if ctypes.sizeof(getattr(abi, s)) != kernel_header_values[f"sizeof_{s}"]}
    assert not wrong


def test_struct_flattening_round_trips_and_names_members():
    sregs = structs.from_nested(abi.kvm_sregs, {"cs": {"selector": 0x23, "l": 1}, "cr3": 0x2000,
                                               "interrupt_bitmap": [1, 2, 3, 1 << 63]})
    values = structs.values_of(sregs, "sregs.")
    assert values["sregs.cs.selector"] == 0x23 and values["sregs.cr3"] == 0x2000
    assert values["sregs.interrupt_bitmap"] == [1, 2, 3, 1 << 63]
    assert not any(".pad" in k for k in values)
    assert bytes(structs.load_into(abi.kvm_sregs(), values, "sregs.")) == bytes(sregs)
    names = [f.name for f in structs.fields_of(abi.kvm_xcrs, "xcrs.")]
    assert names[:4] == ["xcrs.nr_xcrs", "xcrs.flags", "xcrs.xcrs[0].xcr", "xcrs.xcrs[0].value"]


def test_vcpu_section_encodes_and_decodes_through_vmstate():
    desc = vcpu_description(4096)
    rng = np.random.default_rng(1)
    values = {f.name: (rng.bytes(f.size * f.count) if f.type == "buffer" else
                       [int(x) for x in rng.integers(0, 1 << (8 * f.size - 1), f.count)] if f.count > 1 else
                       int(rng.integers(0, 1 << (8 * f.size - 1))))
              for f in desc.fields}
    assert decode(desc, vmstate.encode_state(desc, values)) == values
    section = vmstate.DeviceSection(7, "kvm-cpu", 0, desc, values)
    assert b'"vmsd_name": "kvm-cpu"' in vmstate.vmdesc_json([section])


def test_uart_registers_and_output(tmp_path):
    out = tmp_path / "serial.out"
    sink = SerialSink(str(out))
    uart = Uart16550(sink, 10)
    base = 0x3F8
    assert uart.read(base + 5) & 0x60 == 0x60  # THRE|TEMT: the transmit loop never waits
    for ch in b"hi\n":
        uart.write(base, ch)
    uart.write(base + 3, 0x80)  # DLAB: 0/1 address the divisor
    uart.write(base, 0x01)
    uart.write(base + 1, 0x00)
    assert uart.divider == 1 and uart.read(base) == 1
    uart.write(base + 3, 0x03)
    assert uart.read(base + 2) & 0x0F == 0x01  # no interrupt pending
    uart.write(base + 1, 0x02)  # enable THR-empty interrupt: reported once by IIR
    assert uart.read(base + 2) & 0x0F == 0x02
    assert uart.read(base + 2) & 0x0F == 0x01
    uart.write(base + 7, 0x5A)
    state = uart.save()
    other = Uart16550(SerialSink(None), 10)
    other.load(decode(SERIAL, vmstate.encode_state(SERIAL, state)))
    assert other.save() == state and other.read(base + 7) == 0x5A
    sink.close()
    assert out.read_bytes() == b"hi\n"


def test_serial_unix_socket_delivers_output_to_clients(tmp_path):
    import socket
    import time

    path = tmp_path / "serial.sock"
    sink = SerialSink(f"unix:{path}")
    try:
        sink.write(b"dropped: nobody listens")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.settimeout(5)
        deadline = time.monotonic() + 5
        while not sink._clients and time.monotonic() < deadline:
            time.sleep(0.01)
        sink.write(b"hello")
        assert client.recv(100) == b"hello"
        client.close()
    finally:
        sink.close()


def _walk(ram: np.ndarray, addr: int) -> tuple[int, int]:
    """(physical address, flags of the leaf) by walking the 4-level tables like the MMU."""
    words = ram.view(np.uint64)
    pml4e = int(words[boot.PML4_BASE // 8 + ((addr >> 39) & 511)])
    pdpte = int(words[(pml4e & ~0xFFF) // 8 + ((addr >> 30) & 511)])
    pde = int(words[(pdpte & ~0xFFF) // 8 + ((addr >> 21) & 511)])
    assert pml4e & pdpte & pde & 0x7 == 0x7, "present, writable, user at every level"
    assert pde & 0x80, "2 MiB page"
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (addr & 0x1FFFFF), pde & 0xFFF


def test_boot_tables_identity_map_ram_for_user_mode():
    ram = np.zeros(2 << 20, dtype=np.uint8)
    code = b"\x90" * 100
    boot.install(ram, 5 << 30, code, {"rdi": 7, "rbx": 9})
    for addr in (0, 0x123456, (1 << 30) + 0x1000, (5 << 30) - 1):
        assert _walk(ram, addr)[0] == addr
    small = np.zeros(2 << 20, dtype=np.uint8)
    boot.install(small, 64 << 20, code, {})
    assert _walk(small, 0xFFFFFFF0)[0] == 0xFFFFFFF0, "a PC's reset vector stays mapped for bios.S"
    args = ram[boot.BOOT_ARGS:boot.BOOT_ARGS + 8 * len(boot.BOOT_REGISTERS)].view(np.uint64)
    assert dict(zip(boot.BOOT_REGISTERS, args.tolist())) == {
        "rip": build.CODE_BASE, "rsp": boot.STACK_TOP, "rdi": 7, "rsi": 0, "rdx": 0, "rcx": 0, "rbx": 9}
    assert len(boot.gdt_bytes()) == 8 * build.GUEST_H["GDT_ENTRIES"], "bios.S loads the GDT with this limit"
    assert boot.STACK_TOP <= 0xA0000, "a PC has VGA and ROM above 640 KiB"
    assert bytes(ram[build.CODE_BASE:build.CODE_BASE + 100]) == code
    tss = bytes(ram[boot.TSS_BASE:boot.TSS_BASE + boot.TSS_SIZE])
    iomap = int.from_bytes(tss[0x66:0x68], "little")
    bitmap = tss[iomap:]
    for port in (0x3F8, 0x3FD, 0x700):
        assert not bitmap[port // 8] >> (port % 8) & 1, f"port {port:#x} closed"
    assert bitmap[-1] == 0xFF
    gdt = ram[boot.GDT_BASE:boot.GDT_BASE + 56].view(np.uint64)
    user_code = int(gdt[boot.SEL_USER_CODE >> 3])
    assert (user_code >> 45) & 3 == 3 and (user_code >> 53) & 1 == 1  # DPL 3, long mode
    sregs = boot.initial_sregs()
    assert sregs["cs"]["dpl"] == sregs["ss"]["dpl"] == 3 and sregs["cs"]["l"] == 1


def test_programs_take_the_workload_options_clamped_to_ram():
    mib = 1 << 20
    ab = program_for(GuestSpec.parse("ab"), 64 * mib, 10**9)
    assert ab.name == "ab" and ab.arguments == {"rdi": mib, "rsi": 64 * mib, "rbx": 1000}
    ab = program_for(GuestSpec.parse("ab:start=0,end=8M,sleep=0"), 64 * mib, 10**9)
    assert ab.arguments == {"rdi": mib, "rsi": 8 * mib, "rbx": 0}
    stress = program_for(GuestSpec.parse("stress:rate=4,wss=16M"), 64 * mib, 2 * 10**9)
    assert stress.arguments == {"rdi": mib, "rsi": 4096, "rdx": 1024, "rcx": 2 * 10**9, "rbx": 5000}
    spinning = program_for(GuestSpec.parse("stress:rate=4,wss=16M,tick=0"), 64 * mib, 2 * 10**9)
    assert spinning.arguments["rbx"] == 0
    checksum = program_for(GuestSpec.parse("checksum:size=100M,rounds=7"), 32 * mib, 10**9)
    assert checksum.arguments == {"rdi": mib, "rsi": 31 * mib // 8, "rdx": 7}
    assert program_for(GuestSpec.parse("idle"), 64 * mib, 10**9) is None
    with pytest.raises(ValueError, match="needs more than 1 MiB"):
        program_for(GuestSpec.parse("ab"), mib, 10**9)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_programs_assemble_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMIGRATE_CACHE", str(tmp_path))
    assert build.program_names() == ["ab", "checksum", "stress"]
    image = build.image("ab")
    assert 0 < len(image) < 4096
    cached = list(tmp_path.rglob("ab-*.bin"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    assert build.image("ab") == image and cached[0].stat().st_mtime_ns == stamp
    with pytest.raises(build.GuestBuildError, match="no guest program 'nosuch'"):
        build.image("nosuch")
    bios = build.image(build.BIOS)
    assert len(bios) == 64 << 10 and bios[0xFFF0] == 0xE9, "a 64 KiB ROM with a near jump at the reset vector"


def test_software_checksum_workload_matches_the_reference():
    ram = RAMBlock("ram", 4 << 20)
    ram.dirty.start("test")
    work = GuestSpec.parse("checksum:size=64K,rounds=5").build(ram)
    for _ in range(10):
        work.step()
    header = ram.bytes[:32].view(np.uint64)
    assert int(header[1]) == 6, "rounds + 1 once finished"
    assert int(header[3]) == checksum_reference(64 * 1024 // 8, 5)
    dirty = np.zeros(ram.npages, dtype=np.bool_)
    ram.dirty.collect_into("test", dirty)
    assert dirty[256:256 + 16].all() and not dirty[256 + 16:].any()


def test_accel_kvm_where_kvm_cannot_run_is_a_one_line_error(monkeypatch, tmp_path):
    from vmigrate.cli.main import CLIError
    from vmigrate.cli.run import parse_accel
    from vmigrate.machine.kvm import system

    monkeypatch.setattr(system, "DEVICE", str(tmp_path / "kvm"))
    system.probe.cache_clear()
    try:
        with pytest.raises(CLIError, match=r"^KVM is not available: cannot open .*/kvm: No such file"):
            parse_accel("kvm")
        assert parse_accel(None) == ("soft", 0), "the default falls back to the software vCPU"
        assert parse_accel("soft") == ("soft", 0)
        with pytest.raises(CLIError, match="accelerator 'soft' has no option 'dirty-ring-size=8'"):
            parse_accel("soft,dirty-ring-size=8")
    finally:
        system.probe.cache_clear()
