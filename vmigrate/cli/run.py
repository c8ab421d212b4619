"""``vmigrate run``: start one VM process (the counterpart of a QEMU process)."""

from __future__ import annotations

import argparse
import uuid as uuidlib
from typing import TYPE_CHECKING

from vmigrate.cli.main import CLIError
from vmigrate.trace import setup_logging, trace

if TYPE_CHECKING:
    from vmigrate.block.node import BlockGraph
    from vmigrate.machine.net import Nic
    from vmigrate.objects import UserObjects


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="start a VM process with a QMP server")
    p.add_argument("--name", help="VM name (query-name)")
    p.add_argument("--uuid", help="VM UUID (query-uuid; checked by validate-uuid)")
    p.add_argument("-m", "--memory", default="128M", help="guest RAM size, e.g. 256M, 4G (RAM block 'ram')")
    p.add_argument("--mem-path", help="back guest RAM by this file, shared (like memory-backend-file,share=on)")
    p.add_argument("--smp", type=int, default=1, help="number of vCPUs")
    p.add_argument("--accel", help="vCPU backend: kvm[,dirty-ring-size=N] | soft "
                   "(default: kvm where /dev/kvm can run a VM, else soft)")
    p.add_argument("--guest", default="idle", help="workload: idle | ab[:start=SIZE,end=SIZE,sleep=MS] | "
                   "stress:rate=MBPS,wss=SIZE[,tick=MS][,disk=DEVICE_OR_NODE,disk-rate=MBPS] | "
                   "checksum[:size=SIZE,rounds=N]; stress's disk= also writes that --drive/--blockdev, "
                   "4 KiB blocks stamped with the disk step (docs/block-migration.md)")
    p.add_argument("--serial", help="KVM only: the UART's output to FILE, 'stdio' or 'unix:PATH' "
                   "(a socket clients connect to); default: discarded")
    p.add_argument("--qmp", action="append", default=[], help="QMP server: unix:PATH or tcp:HOST:PORT (repeatable)")
    p.add_argument("--incoming", help="wait for an incoming migration: 'defer' or a URI")
    p.add_argument("--object", action="append", default=[], metavar="TYPE,id=ID,...",
                   help="create an object, like QEMU's -object (',,' is a literal comma): "
                   "tls-creds-x509,id=ID,dir=DIR[,endpoint=client|server][,verify-peer=on|off][,sanity-check=on|off], "
                   "tls-creds-psk,id=ID,dir=DIR[,endpoint=client|server][,username=NAME], "
                   "tls-creds-anon,id=ID[,dir=DIR][,endpoint=client|server], "
                   "authz-simple,id=ID,identity=DN, "
                   "authz-list,id=ID[,policy=allow|deny][,rules.N.match=M,rules.N.policy=P[,rules.N.format=exact|glob]] "
                   "(repeatable)")
    p.add_argument("--blockdev", action="append", default=[], metavar="driver=qcow2|raw,node-name=NAME,file=PATH,...",
                   help="open a disk image as a block node, like QEMU's -blockdev "
                   "([,backing=NODE|null][,read-only=on]; file.filename=PATH and JSON work too) (repeatable)")
    p.add_argument("--drive", action="append", default=[], metavar="file=PATH,format=qcow2|raw,id=ID,...",
                   help="a disk with a device name, like QEMU's -drive if=none "
                   "([,node-name=NAME][,readonly=on]); block migration sends device names (repeatable)")
    p.add_argument("--nic", action="append", default=[], metavar="tap|raw,ifname=NAME[,mac=MAC][,id=ID]",
                   help="a NIC for self-announce (docs/announce.md): tap opens or makes tap interface NAME, "
                   "raw sends through existing interface NAME (AF_PACKET); id is what announce-self's "
                   "interfaces names (default nicN) (repeatable)")
    p.add_argument("--device", action="append", default=[],
                   metavar="failover-primary,id=ID[,unplug-delay=MS]", help="a failover primary NIC, which a migration asks the guest to unplug first (wait-unplug; "
                   "the software guest ejects it after unplug-delay ms, default 100) (repeatable)")
    p.add_argument("-S", dest="start_paused", action="store_true", help="start with the guest paused")
    p.add_argument("--trace", action="append", default=[], metavar="PATTERN",
                   help="print the trace points matching PATTERN to stderr, like QEMU's -trace: "
                   "names from QEMU's migration/trace-events, globs, comma-separated (repeatable)")
    p.add_argument("-v", "--verbose", action="count", default=0, help="also log info (-v) and debug (-vv) messages")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    from vmigrate.machine.guest import GuestSpec
    from vmigrate.machine.memory import parse_size
    from vmigrate.vm import VMConfig

    try:
        memory = parse_size(args.memory)
        guest = GuestSpec.parse(args.guest)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if args.uuid is not None:
        try:
            uuid = str(uuidlib.UUID(args.uuid))
        except ValueError:
            raise CLIError(f"invalid UUID '{args.uuid}'") from None
    else:
        uuid = None
    if args.smp < 1:
        raise CLIError("--smp must be at least 1")
    accel, dirty_ring_size = parse_accel(args.accel)
    if args.serial is not None and accel != "kvm":
        raise CLIError("--serial needs --accel kvm (the software vCPU has no UART)")
    from vmigrate.machine.failover import FailoverError, FailoverSpec
    from vmigrate.objects import UserObjects

    try:
        failover = [FailoverSpec.parse(text) for text in args.device]
    except FailoverError as err:
        raise CLIError(str(err)) from None
    ids = [spec.id for spec in failover]
    if len(set(ids)) != len(ids):
        raise CLIError("Duplicate ID for device")
    objects = UserObjects()
    for text in args.object:
        add_object(objects, text)
    return VMConfig(
        nics=open_nics(args.nic), objects=objects, block=open_block(args.blockdev, args.drive), memory=memory, mem_path=args.mem_path, name=args.name, uuid=uuid, smp=args.smp, accel=accel,
        dirty_ring_size=dirty_ring_size, serial=args.serial,
        guest=guest, qmp=args.qmp, incoming=args.incoming, start_paused=args.start_paused, failover=failover,
    )


def add_object(objects: "UserObjects", text: str) -> None:
    """``--object TYPE,KEY=VALUE,...``, checked as QEMU's -object checks it (at start, files loaded)."""
    from vmigrate.errors import VMError
    from vmigrate.objects import DuplicateObject

    # QemuOpts' escape: ",," is a comma inside a value (a certificate DN for authz-simple).
    kind, *pairs = [part.replace("\0", ",") for part in text.replace(",,", "\0").split(",")]
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CLIError(f"Invalid parameter '{key}'")
        options[key] = value
    try:
        objects.add(kind, options)
    except DuplicateObject:
        raise CLIError(f"Duplicate ID '{options['id']}' for object") from None
    except VMError as err:
        raise CLIError(err.desc) from None


def open_block(blockdevs: list[str], drives: list[str]) -> "BlockGraph":
    """``--blockdev`` then ``--drive``, opened at start as QEMU opens them (a bad image stops the start)."""
    from vmigrate.block.driver import ImageError
    from vmigrate.block.node import BlockGraph
    from vmigrate.block.options import add_blockdev, add_drive

    graph = BlockGraph()
    try:
        for text in blockdevs:
            add_blockdev(graph, text)
        for text in drives:
            add_drive(graph, text)
    except ImageError as err:
        graph.close()
        raise CLIError(str(err)) from None
    return graph


def open_nics(texts: list[str]) -> list["Nic"]:
    """``--nic``s, opened at start so a missing interface or a refused tap stops the start."""
    from vmigrate.machine.net import NicError, NicSpec, open_nic

    nics: list[Nic] = []
    try:
        specs = [NicSpec.parse(text, i) for i, text in enumerate(texts)]
        ids = [spec.id for spec in specs]
        if len(set(ids)) != len(ids):
            raise NicError("--nic: duplicate id")
        for spec in specs:
            nics.append(open_nic(spec))
    except NicError as err:
        for nic in nics:
            nic.close()
        raise CLIError(str(err)) from None
    return nics


def parse_accel(text: str | None) -> tuple[str, int]:
    """``--accel`` as (backend, dirty ring entries).

    Without it: KVM if it can run a VM here and the guest programs can be
    assembled (gcc), else the software vCPU.
    """
    from vmigrate.machine import kvm
    from vmigrate.machine.x86guest.build import missing_tools

    if text is None:
        return ("kvm" if kvm.probe() is None and not missing_tools() else "soft"), 0
    name, *options = text.split(",")
    if name not in ("kvm", "soft"):
        raise CLIError(f"accelerator '{name}' is not available (this build has: kvm, soft)")
    ring = 0
    for option in options:
        key, sep, value = option.partition("=")
        if name != "kvm" or key != "dirty-ring-size" or not sep:
            raise CLIError(f"accelerator '{name}' has no option '{option}'")
        try:
            ring = int(value, 0)
        except ValueError:
            raise CLIError(f"invalid dirty-ring-size '{value}'") from None
    if name == "kvm" and (reason := kvm.probe()) is not None:
        raise CLIError(f"KVM is not available: {reason}")
    return name, ring


def run(args: argparse.Namespace) -> int:
    from vmigrate.machine.kvm import KvmUnavailable
    from vmigrate.machine.x86guest.build import GuestBuildError
    from vmigrate.migration.errors import MigrationError
    from vmigrate.vm import run_vm

    setup_logging(args.verbose, args.trace)
    config = config_from_args(args)
    # vmigrate's own point (QEMU's command line says all this): the settled configuration,
    # notably which vCPU backend the default picked.
    trace("run_vm", memory=config.memory, smp=config.smp, accel=config.accel,
          dirty_ring_size=config.dirty_ring_size, guest=args.guest, incoming=config.incoming,
          start_paused=config.start_paused)
    try:
        return run_vm(config)
    except (OSError, ValueError, KvmUnavailable, GuestBuildError) as err:
        raise CLIError(str(err)) from None
    except MigrationError as err:
        # The only migration request of a start: QEMU names the option and exits (qemu_start_incoming_migration).
        raise CLIError(f"--incoming {config.incoming}: {err.desc}") from None
