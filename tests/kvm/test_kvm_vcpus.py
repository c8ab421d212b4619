"""The KVM backend in-process: x86 guests run, pause, throttle, log dirty pages and move their state."""

from __future__ import annotations

import time

import numpy as np
import pytest

from checksum_ref import checksum_reference
from vmigrate.harness.waiting import wait_for
from vmigrate.machine.guest import GuestSpec
from vmigrate.machine.kvm import KvmVcpus
from vmigrate.machine.memory import PAGE_SIZE, RAMBlock

MIB = 1 << 20
CLIENT = "test"


def header(ram: RAMBlock) -> np.ndarray:
    """magic, counter, cursor, result (the guests' header page)."""
    return ram.bytes[:32].view(np.uint64)


@pytest.fixture
def machine():
    made: list[KvmVcpus] = []

    def make(guest: str, memory: int = 32 * MIB, **kw) -> tuple[RAMBlock, KvmVcpus]:
        ram = RAMBlock("ram", memory)
        ram.dirty.start(CLIENT)
        errors: list[str] = []
        vcpus = KvmVcpus(ram, kw.pop("smp", 1), GuestSpec.parse(guest), on_error=errors.append, **kw)
        vcpus.errors = errors
        made.append(vcpus)
        return ram, vcpus

    yield make
    for vcpus in made:
        vcpus.shutdown()


def collect(ram: RAMBlock) -> np.ndarray:
    dirty = np.zeros(ram.npages, dtype=np.bool_)
    ram.dirty.collect_into(CLIENT, dirty)
    return dirty


def test_ab_runs_pauses_frozen_and_prints_each_pass(machine, tmp_path):
    out = tmp_path / "serial.out"
    ram, vcpus = machine("ab:end=8M", serial=str(out))
    vcpus.resume_all()
    wait_for(lambda: header(ram)[1] > 100, 10, "100 passes")
    started = time.perf_counter()
    vcpus.pause_all()
    assert time.perf_counter() - started < 0.1
    passes = int(header(ram)[1])
    frozen = ram.bytes.copy()
    time.sleep(0.2)
    assert np.array_equal(ram.bytes, frozen), "a paused guest wrote to RAM"
    column = ram.pages[MIB // PAGE_SIZE:8 * MIB // PAGE_SIZE, 0]
    assert np.isin(column, [passes % 256, (passes - 1) % 256]).all()
    text = out.read_bytes()
    assert passes - 1 <= len(text) <= passes
    steps = (np.frombuffer(text, dtype=np.uint8)[1:].astype(int) - np.frombuffer(text, dtype=np.uint8)[:-1]) % 26
    assert (steps == 1).all(), "one letter per pass, in sequence"
    assert vcpus.exit_counts()["io"] >= 2 * len(text)
    assert not vcpus.errors


def test_checksum_state_moves_to_a_fresh_machine_mid_computation(machine):
    """Save every device at a pause, load into an idle VM with the RAM copied: it finishes the job.

    The second VM runs no program of its own, so the result can only come
    from the loaded vCPU state.
    """
    guest = "checksum:size=1M,rounds=3000"
    ram, source = machine(guest, smp=2)
    source.resume_all()
    wait_for(lambda: header(ram)[1] > 200, 10, "the computation to be under way")
    started = time.perf_counter()
    source.pause_all()  # the guest is in a loop without exits: only the kick gets it out
    assert time.perf_counter() - started < 0.1
    rounds_done = int(header(ram)[1])
    assert rounds_done < 3000
    states = [(d.idstr, d.instance_id, d.save()) for d in source.devices]

    ram2, target = machine("idle", smp=2)
    ram2.bytes[:] = ram.bytes
    assert [(d.idstr, d.instance_id) for d in target.devices] == [(i, n) for i, n, _ in states]
    for device, (_, _, values) in zip(target.devices, states):
        device.load(values)
    target.resume_all()
    wait_for(lambda: header(ram2)[1] == 3001, 30, "the result")
    assert int(header(ram2)[3]) == checksum_reference(MIB // 8, 3000)
    assert int(header(ram)[1]) == rounds_done, "the source stays paused"
    mp_states = [values["mp_state"] for idstr, _, values in states if idstr == "kvm-cpu"]
    assert mp_states == [0, 1], "BSP runnable, AP waiting for SIPI"
    assert not source.errors and not target.errors


@pytest.mark.parametrize("ring", [0, 65536, 4096], ids=["bitmap", "ring", "small-ring"])
def test_dirty_logging_reports_what_the_guest_writes(machine, ring):
    ram, vcpus = machine("ab:start=2M,end=26M,sleep=1", memory=64 * MIB, dirty_ring_size=ring)
    vcpus.resume_all()
    wait_for(lambda: header(ram)[1] > 3, 10, "guest start")
    window = slice(2 * MIB // PAGE_SIZE, 26 * MIB // PAGE_SIZE)  # 6144 pages: more than a small ring holds
    vcpus.dirty_log_start()
    try:
        for _ in range(2):  # the second round proves reported pages are write-protected again
            collect(ram)
            time.sleep(0.2)
            vcpus.dirty_log_sync()
            dirty = collect(ram)
            assert dirty[window].all() and dirty[0]
            assert not dirty[window.stop:].any(), "pages the guest never writes"
        vcpus.pause_all()
        vcpus.dirty_log_sync()
        collect(ram)
        vcpus.dirty_log_sync()
        assert not collect(ram).any(), "nothing is dirtied while paused"
    finally:
        vcpus.dirty_log_stop()
    assert bool(vcpus.dirty_ring_entries) == bool(ring)
    if ring:
        assert vcpus.dirty_ring_counters()[0] >= 2 * (window.stop - window.start)
    if ring == 4096:
        assert vcpus.exit_counts().get("dirty_ring_full", 0) > 0, "a small ring fills, the vCPU harvests it"


def test_throttle_takes_its_share_of_a_busy_guest(machine):
    ram, vcpus = machine("checksum:size=256K,rounds=100000000")
    vcpus.resume_all()

    def rate() -> float:
        before, started = int(header(ram)[1]), time.perf_counter()
        time.sleep(0.5)
        return (int(header(ram)[1]) - before) / (time.perf_counter() - started)

    full = rate()
    vcpus.throttle = 0.5
    half = rate()
    vcpus.throttle = 0.0
    assert 0.25 < half / full < 0.75, (full, half)
    assert 0.7 < rate() / full


def test_idle_guest_leaves_ram_alone(machine):
    ram, vcpus = machine("idle", memory=8 * MIB, smp=2)
    ram.bytes[:] = 0x5A
    vcpus.resume_all()
    time.sleep(0.2)
    vcpus.pause_all()
    assert (ram.bytes == 0x5A).all()
    assert [s.save()["mp_state"] for s in vcpus.cpu_states] == [3, 1], "halted BSP, uninitialised AP"
    assert vcpus.exit_counts() == {}


def test_a_crashing_guest_is_reported_and_stays_stopped(machine):
    ram, vcpus = machine("ab:end=4M,sleep=1")
    vcpus.resume_all()
    wait_for(lambda: header(ram)[1] > 3, 10, "guest start")
    vcpus.pause_all()
    rip = vcpus.cpus[0].get_regs().rip
    ram.bytes[rip:rip + 2] = (0x0F, 0x0B)  # ud2: #UD with no IDT, a triple fault
    vcpus.resume_all()
    wait_for(lambda: vcpus.errors, 10, "the error report")
    assert "shutdown" in vcpus.errors[0] and f"{rip:#x}" in vcpus.errors[0]
    vcpus.pause_all()
    vcpus.resume_all()
    time.sleep(0.1)
    assert len(vcpus.errors) == 1, "a failed vCPU does not run again"
