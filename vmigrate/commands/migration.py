"""Migration commands of the schema (qapi/migration.json)."""

from __future__ import annotations

import logging
import os
import select
import stat
import time

from vmigrate.commands import command
from vmigrate.machine import host
from vmigrate.machine.announce import AnnounceParameters
from vmigrate.machine.write_tracking import write_tracking_compatible
from vmigrate.migration.ram import migrated_blocks
from vmigrate.migration.savevm import LoadError
from vmigrate.migration.wire import WireError
from vmigrate.qmp.errors import QMPError

log = logging.getLogger(__name__)

#: A device-only stream holds no RAM, only device sections (a few KiB, docs/qemu/misc.md §5):
#: a longer file is no such stream and is refused instead of read whole.
DEVICE_STATE_MAX = 16 << 20
#: Seconds ``xen-load-devices-state`` waits for its file's data.  The handler runs on the
#: monitors' event loop, so a FIFO whose writer stalls must not stop it for long (QEMU
#: blocks its main loop there).
DEVICE_STATE_READ_S = 2.0
#: Bytes asked for per read of the device state file.
DEVICE_STATE_CHUNK = 1 << 20
IO_ERROR = "An IO error has occurred"


@command("query-migrate")
def query_migrate(vm, args, monitor):
    return vm.migration.query()


@command("migrate-set-capabilities")
def migrate_set_capabilities(vm, args, monitor):
    mig = vm.migration
    mig.options.set_capabilities(
        args["capabilities"],
        migration_running=mig.outgoing_running,
        runstate=vm.runstate.state,
        incoming_single_channel=mig.incoming.single_channel,
        postcopy_supported=host.postcopy_supported,
        uffd_wp_supported=host.uffd_write_protect_supported,
        # QEMU's check skips the blocks ignored under the capabilities already set (ramblock_is_ignored).
        ram_wp_compatible=lambda: write_tracking_compatible(migrated_blocks(vm.ram_blocks, mig.options.snapshot())),
    )


@command("query-migrate-capabilities")
def query_migrate_capabilities(vm, args, monitor):
    return vm.migration.options.query_capabilities()


@command("migrate-set-parameters")
def migrate_set_parameters(vm, args, monitor):
    vm.migration.set_parameters(args)


@command("query-migrate-parameters")
def query_migrate_parameters(vm, args, monitor):
    return vm.migration.options.query_parameters()


@command("migrate")
def migrate(vm, args, monitor):
    vm.migration.migrate(args["uri"], args, monitor.named_fds)


@command("migrate-incoming")
def migrate_incoming(vm, args, monitor):
    vm.migration.incoming.start(args["uri"], monitor.named_fds)


@command("migrate_cancel")
def migrate_cancel(vm, args, monitor):
    vm.migration.cancel()


@command("migrate-continue")
def migrate_continue(vm, args, monitor):
    vm.migration.continue_(args["state"])


@command("migrate-start-postcopy")
def migrate_start_postcopy(vm, args, monitor):
    opts = vm.migration.options
    if not (opts.cap("postcopy-ram") or opts.cap("dirty-bitmaps")):
        raise QMPError("Enable postcopy with migrate_set_capability before the start of migration")
    if vm.migration.outgoing_status == "none":
        raise QMPError("Postcopy must be started after migration has been started")
    vm.migration.start_postcopy()


@command("migrate-pause")
def migrate_pause(vm, args, monitor):
    vm.migration.pause()


@command("migrate-recover")
def migrate_recover(vm, args, monitor):
    vm.migration.incoming.recover(args["uri"])


@command("query-colo-status")
def query_colo_status(vm, args, monitor):
    return vm.migration.colo.query()


@command("x-colo-lost-heartbeat")
def x_colo_lost_heartbeat(vm, args, monitor):
    vm.migration.colo.lost_heartbeat()


@command("client_migrate_info")
def client_migrate_info(vm, args, monitor):
    if args["protocol"] != "spice":
        raise QMPError("Parameter 'protocol' expects 'spice'")
    raise QMPError("SPICE is not in use", "DeviceNotActive")


@command("xen-set-global-dirty-log")
def xen_set_global_dirty_log(vm, args, monitor):
    """Accepted without effect, as on any non-Xen QEMU."""


@command("query-migrationthreads")
def query_migrationthreads(vm, args, monitor):
    return vm.migration.thread_list()


@command("calc-dirty-rate")
def calc_dirty_rate(vm, args, monitor):
    vm.dirty_rate.start(args["calc-time"], args.get("sample-pages"), args.get("mode"))


@command("query-dirty-rate")
def query_dirty_rate(vm, args, monitor):
    return vm.dirty_rate.query()


@command("set-vcpu-dirty-limit")
def set_vcpu_dirty_limit(vm, args, monitor):
    vm.dirty_limit.set_limit(args.get("cpu-index"), args["dirty-rate"])


@command("cancel-vcpu-dirty-limit")
def cancel_vcpu_dirty_limit(vm, args, monitor):
    vm.dirty_limit.cancel(args.get("cpu-index"))


@command("query-vcpu-dirty-limit")
def query_vcpu_dirty_limit(vm, args, monitor):
    return vm.dirty_limit.query()


def _yank_instances(vm) -> list[dict]:
    """Registered yank instances in QEMU's order: monitor chardevs, then migration."""
    instances = [{"type": "chardev", "id": name} for name in vm.qmp.chardev_ids()]
    if vm.migration.yank_registered:
        instances.append({"type": "migration"})
    return instances


@command("query-yank")
def query_yank(vm, args, monitor):
    return _yank_instances(vm)


@command("yank")
def yank(vm, args, monitor):
    registered = _yank_instances(vm)
    if any(i not in registered for i in args["instances"]):
        raise QMPError("Instance not found", "DeviceNotFound")
    for instance in args["instances"]:
        if instance["type"] == "migration":
            vm.migration.yank()
        else:
            vm.qmp.yank_chardev(instance["id"])


@command("announce-self")
def announce_self(vm, args, monitor):
    """Starts the timer named ``id`` on the ``--nic``s (net/announce.c qmp_announce_self; no range
    checks, as in QEMU: docs/qemu/misc.md §1.2).  A VM without NICs sends nothing and answers {}."""
    vm.announcer.announce_self(AnnounceParameters.from_qmp(args))


@command("xen-save-devices-state")
def xen_save_devices_state(vm, args, monitor):
    """Device-only stream to a file, the guest stopped meanwhile (docs/qemu/misc.md §5)."""
    filename = args["filename"]
    was_running = vm.runstate.stop("save-vm")
    vm.global_state.runstate = "running"
    try:
        try:
            fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o660)
        except OSError as err:
            raise QMPError(f"Unable to open {filename}: {os.strerror(err.errno)}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(vm.sections.device_state_stream())
        except OSError:
            raise QMPError("An IO error has occurred") from None
    finally:
        if was_running:
            vm.runstate.start()


@command("xen-load-devices-state")
def xen_load_devices_state(vm, args, monitor):
    if vm.runstate.running:
        raise QMPError("Cannot update device state while vm is running")
    filename = args["filename"]
    try:
        # Non-blocking, so that opening a FIFO without a writer does not wait for one.
        fd = os.open(filename, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise QMPError(f"Unable to open {filename}: {os.strerror(err.errno)}") from None
    try:
        data = _read_device_state(fd, time.monotonic() + DEVICE_STATE_READ_S)
    except OSError as err:
        log.warning("xen-load-devices-state: %s: %s", filename, err)
        raise QMPError(IO_ERROR) from None
    finally:
        os.close(fd)
    try:
        vm.sections.load_device_state(data)
    except (WireError, LoadError):
        raise QMPError(IO_ERROR) from None


def _read_device_state(fd: int, deadline: float) -> bytes:
    """The file's bytes up to its end; OSError past :data:`DEVICE_STATE_MAX` bytes or the deadline.

    QEMU reads the stream as it parses it and so stops at the first bad
    section; the stream parser here takes whole bytes, so the bound is on
    what is read.  Every read waits for input first: a FIFO whose writer
    has not come yet reads as empty instead of blocking.
    """
    info = os.fstat(fd)
    if stat.S_ISREG(info.st_mode) and info.st_size > DEVICE_STATE_MAX:
        raise OSError(f"{info.st_size} bytes is too long for a device state stream")
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = bytearray()
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise OSError(f"no end of the device state stream within {DEVICE_STATE_READ_S} s")
        try:
            chunk = os.read(fd, min(DEVICE_STATE_CHUNK, DEVICE_STATE_MAX + 1 - len(data)))
        except BlockingIOError:
            continue
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > DEVICE_STATE_MAX:
            raise OSError(f"more than {DEVICE_STATE_MAX} bytes is too long for a device state stream")
