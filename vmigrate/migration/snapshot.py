"""Internal snapshots: the work of ``snapshot-save``, ``snapshot-load`` and ``snapshot-delete``.

QEMU's migration/savevm.c (save_snapshot, load_snapshot, qemu_savevm_state,
qemu_loadvm_state) over block/snapshot.c's group operations; the steps,
their order and their texts are in docs/qemu/snapshot-jobs.md §3-§6.  The VM
state is an ordinary migration stream, written into the VM-state area of the
``vmstate`` node's qcow2 image through a :class:`VMStateChannel`, and read
back the same way.  Unlike QEMU, a load whose stream turns out broken puts
the guest's RAM and device state back as they were before it started.
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Callable

from vmigrate.block.driver import ImageError, Snapshot
from vmigrate.block.node import BlockNode
from vmigrate.errors import VMError
from vmigrate.migration.channel import Channel, ChannelError
from vmigrate.migration.config import MigrationConfig
from vmigrate.migration.port import MigrationHost
from vmigrate.migration.qemu_file import QEMUFileIn
from vmigrate.migration.savevm import LoadContext, LoadError, LoadVM, SaveVM
from vmigrate.migration.wire import WireError
from vmigrate.trace import trace

if TYPE_CHECKING:
    from vmigrate.machine.memory import RAMBlock
    from vmigrate.migration.migration import OutgoingSession

log = logging.getLogger(__name__)


class VMStateChannel(Channel):
    """The VM-state area of one node as a channel: written from 0 on save, read up to *size* on load."""

    def __init__(self, node: BlockNode, size: int = 0) -> None:
        self.node = node
        self.size = size
        self.pos = 0

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        try:
            with self.node.lock:
                self.node.driver.write_vmstate(self.pos, data)
        except (ImageError, OSError) as err:
            raise ChannelError(str(err)) from None
        self.pos += len(data)

    def read(self, size: int) -> bytes:
        size = min(size, self.size - self.pos)
        if size <= 0:
            return b""
        try:
            with self.node.lock:
                data = self.node.driver.read_vmstate(self.pos, size)
        except (ImageError, OSError) as err:
            raise ChannelError(str(err)) from None
        self.pos += len(data)
        return data

    def close(self) -> None:
        pass


def check_devices(host: MigrationHost, devices: list[str]) -> list[BlockNode]:
    """The device list rules shared by the three jobs (docs/qemu/snapshot-jobs.md §3)."""
    if not devices:
        raise VMError("At least one device is required for snapshot")
    nodes = []
    for name in devices:
        node = host.block.node(name)
        if node is None:
            raise VMError(f"No block device node '{name}'")
        if node.read_only or not node.driver.supports_snapshots:
            raise VMError(f"Device '{node.device_or_node_name}' is writable but does not support snapshots")
        nodes.append(node)
    return nodes


def _vmstate_node(nodes: list[BlockNode], vmstate: str) -> BlockNode:
    node = next((n for n in nodes if n.node_name == vmstate), None)
    if node is None:
        raise VMError(f"vmstate block device '{vmstate}' does not exist")
    return node


def _find(node: BlockNode, tag: str) -> Snapshot | None:
    """The first snapshot named *tag* (QEMU's bdrv_snapshot_find)."""
    return next((s for s in node.driver.snapshots() if s.name == tag), None)


def save(host: MigrationHost, session_for_snapshot: Callable[[], "OutgoingSession"], tag: str, vmstate: str,
         devices: list[str], vm_clock_ns: int) -> None:
    """save_snapshot: checks, stop, the stream into the VM-state area, a snapshot on every device.

    *session_for_snapshot* makes the attempt ``query-migrate`` reports
    (``MigrationManager.snapshot_session``), raising QEMU's texts when a
    migration runs or block migration is on; it is called with the VM stopped,
    as QEMU stops and restarts it around that failure too.
    """
    nodes = check_devices(host, devices)
    if all(_find(n, tag) is not None for n in nodes):
        raise VMError(f"Snapshot '{tag}' already exists in one or more devices")
    target = _vmstate_node(nodes, vmstate)
    runstate = host.runstate
    host.global_state.runstate = runstate.state
    was_running = runstate.stop("save-vm")
    try:
        now_ns = time.time_ns()
        date_sec, date_nsec = divmod(now_ns // 1000 * 1000, 1_000_000_000)
        session = session_for_snapshot()
        size = _save_stream(host, session, target)
        created: list[BlockNode] = []
        try:
            for node in nodes:
                with node.lock:
                    node.driver.create_snapshot(tag, date_sec, date_nsec, vm_clock_ns,
                                                size if node is target else 0)
                created.append(node)
        except (ImageError, OSError) as err:
            log.error("snapshot '%s' on '%s': %s", tag, node.node_name, err)
            for done in created:
                _delete_first(done, tag)
            raise VMError(f"Could not create snapshot '{tag}' on '{node.device_or_node_name}'") from None
    finally:
        if was_running:
            runstate.start()


def _save_stream(host: MigrationHost, session: "OutgoingSession", node: BlockNode) -> int:
    """qemu_savevm_state: header to EOF in one go, no rate limit; the stream's size."""
    channel = VMStateChannel(node)
    saver = SaveVM(host.sections, session.snapshot_context(channel), host.machine_type, host.uuid)
    error = None
    try:
        saver.setup()
        while not saver.iterate():
            pass
        saver.complete()
    except (ChannelError, OSError) as err:
        error = f"Error while writing VM state: {err}"
    finally:
        saver.cleanup()
    trace("savevm_state_complete", size=channel.pos)
    session.snapshot_done(error)
    if error is not None:
        raise VMError(error)
    return channel.pos


def load(host: MigrationHost, config: MigrationConfig, tag: str, vmstate: str, devices: list[str]) -> None:
    """load_snapshot: stop in ``restore-vm`` first, checks, revert, the stream, restart.

    On any failure the guest stays stopped in ``restore-vm``, as in QEMU;
    ``cont`` resumes it.
    """
    running_before = host.runstate.stop("restore-vm")
    nodes = check_devices(host, devices)
    if not all(_find(n, tag) is not None for n in nodes):
        raise VMError(f"Snapshot '{tag}' does not exist in one or more devices")
    target = _vmstate_node(nodes, vmstate)
    snapshot = _find(target, tag)
    if snapshot.vm_state_size == 0:
        raise VMError("This is a disk-only snapshot. Revert to it  offline using qemu-img")
    for node in nodes:
        if any(b.enabled for b in node.bitmaps.values()):
            raise VMError(f"Could not load snapshot '{tag}' on '{node.device_or_node_name}': "
                          "Device has active dirty bitmaps")
    for node in nodes:
        try:
            with node.lock:
                node.driver.goto_snapshot(_find(node, tag).id)
        except (ImageError, OSError) as err:
            raise VMError(f"Could not load snapshot '{tag}' on '{node.device_or_node_name}': "
                          f"Failed to load snapshot: {err}") from None
    _load_stream(host, config, target, snapshot.vm_state_size)
    if running_before:
        host.runstate.start()


def _load_stream(host: MigrationHost, config: MigrationConfig, node: BlockNode, size: int) -> None:
    """qemu_loadvm_state over the VM-state area, undone if the stream breaks part way."""
    devices = host.sections.device_state_stream()
    loader = LoadVM(host.sections, LoadContext(config, ram_fresh=False), host.machine_type, host.uuid, lambda command: None)
    with RamBackup(host.ram_blocks) as backup:
        try:
            loader.run(QEMUFileIn(VMStateChannel(node, size)))
        except (WireError, LoadError, ChannelError, OSError, ImageError) as err:
            log.error("snapshot load: %s", err)
            backup.restore()
            host.sections.load_device_state(devices)
            raise VMError("Error -22 while loading VM state") from None
        finally:
            for block in host.ram_blocks:
                block.end_incoming()


class RamBackup:
    """A copy of guest RAM in a memfd, to undo a load.

    Written with one ``write`` per block, the copy is the kernel's: about six
    times faster than numpy copying into fresh anonymous memory (0.4 s against
    2.3 s for 1 GiB here), whose page faults dominate.
    """

    def __init__(self, blocks: "list[RAMBlock]") -> None:
        self.blocks = blocks
        self.fd = os.memfd_create("vmigrate-snapshot-undo", os.MFD_CLOEXEC)

    def __enter__(self) -> "RamBackup":
        try:
            pos = 0
            for block in self.blocks:
                view = memoryview(block.bytes).cast("B")
                done = 0
                while done < len(view):
                    done += os.pwrite(self.fd, view[done:], pos + done)
                pos += len(view)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def restore(self) -> None:
        pos = 0
        for block in self.blocks:
            view = memoryview(block.bytes).cast("B")
            done = 0
            while done < len(view):
                done += os.preadv(self.fd, [view[done:]], pos + done)
            pos += len(view)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)


def delete(host: MigrationHost, tag: str, devices: list[str]) -> None:
    """delete_snapshot: the first snapshot named *tag* on each device; an absent tag is no error."""
    nodes = check_devices(host, devices)
    for node in nodes:
        try:
            _delete_first(node, tag)
        except (ImageError, OSError) as err:
            raise VMError(f"Could not delete snapshot '{tag}' on '{node.device_or_node_name}': {err}") from None


def _delete_first(node: BlockNode, tag: str) -> None:
    with node.lock:
        snapshot = _find(node, tag)
        if snapshot is not None:
            node.driver.delete_snapshot(snapshot.id)
