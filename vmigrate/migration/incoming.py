"""The incoming migration: QEMU's MigrationIncomingState and load loop.

Unlike QEMU 7.2, which exits the whole process when a load fails, a
vmigrate destination stays up in state ``failed`` with an ``error-desc``:
a hostile or broken stream costs the migration, never the process.  The
loader is the sans-IO :class:`~vmigrate.migration.wire.stream.StreamDecoder`
fed from the channel; its events are applied to guest RAM and devices here.
"""

from __future__ import annotations

import threading
import uuid as uuidlib
from typing import TYPE_CHECKING

from vmigrate.migration.channel import Channel, ChannelError, CommandChannel, FdChannel, Listener, parse_uri
from vmigrate.migration.multifd import MultifdError, MultifdReceiver, recv_exact
from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.state import MigrationStateMachine
from vmigrate.migration.qemu_file import QEMUFileIn
from vmigrate.migration.ram import RamLoader
from vmigrate.migration.savevm import device_bodies
from vmigrate.migration.wire import ram as wire_ram
from vmigrate.migration.wire import multifd as wire_multifd
from vmigrate.migration.wire import return_path, stream, vmstate
from vmigrate.migration.wire.errors import WireError
from vmigrate.qmp.errors import QMPError

if TYPE_CHECKING:
    from vmigrate.qmp.protocol import MonitorProtocol
    from vmigrate.vm import VM


class LoadError(Exception):
    """A stream that is valid on the wire but not acceptable for this VM."""


class IncomingMigration(MigrationStateMachine):
    def __init__(self, vm: "VM", options: MigrationOptions) -> None:
        super().__init__(vm, options)
        self.started = False
        #: Once a single-channel transport (exec:, fd:) was used, multifd is refused.
        self.single_channel = False
        self.listener: Listener | None = None
        self.error_desc: str | None = None
        self._channel: Channel | None = None
        #: The return path, once the source asked for it (OPEN_RETURN_PATH).
        self._rp: Channel | None = None
        self._thread: threading.Thread | None = None
        #: Multifd channels by id, once each has sent a valid initial packet.
        self._multifd_channels: list[Channel] = []

    def start(self, uri: str, monitor: "MonitorProtocol | None" = None) -> None:
        """``migrate-incoming`` / ``--incoming URI`` (states.md §9)."""
        if self.started:
            raise QMPError("The incoming migration has already been started")
        if self.vm.runstate.state != "inmigrate":
            raise QMPError("'-incoming' was not specified on the command line")
        self.vm.emit_event("MIGRATION", {"status": "setup"})
        addr = parse_uri(uri, incoming=True)
        if addr.kind in ("tcp", "unix"):
            self.listener = Listener(addr)
            target = self._accept
        elif addr.kind == "exec":
            self.single_channel = True
            target = lambda: self._load(CommandChannel(addr.command, outgoing=False))  # noqa: E731
        else:
            fd = monitor.named_fds.pop(addr.fdname, None) if monitor is not None else None
            if fd is None:
                raise QMPError(f"File descriptor named '{addr.fdname}' has not been found")
            self.single_channel = True
            target = lambda: self._load(FdChannel(fd))  # noqa: E731
        self.started = True
        self._thread = threading.Thread(target=target, name="incoming", daemon=True)
        self._thread.start()

    def query(self, info: dict) -> None:
        """The destination pass of ``query-migrate``."""
        listener = self.listener
        if listener is not None:
            info["socket-address"] = [listener.address]
        if self.state == "none":
            return
        info["status"] = self.state
        if self.state == "failed" and self.error_desc:
            info["error-desc"] = self.error_desc

    def close(self) -> None:
        self._close_listener()
        if self._channel is not None:
            self._channel.shutdown()
        for channel in list(self._multifd_channels):
            channel.shutdown()

    # -- the incoming thread ------------------------------------------------

    def _accept(self) -> None:
        """The first connection is the main channel; with multifd, the next N are its channels.

        As in QEMU 7.2 the main channel is not read before every multifd
        channel has connected and sent a valid initial packet.
        """
        listener = self.listener
        try:
            channel = listener.accept()
        except ChannelError:
            return
        if self.options.cap("multifd"):
            try:
                self._accept_multifd(listener)
            except (WireError, MultifdError) as err:
                channel.close()
                self._fail_setup(str(err))
                return
            except ChannelError:
                channel.close()
                return
        self._load(channel)

    def _fail_setup(self, desc: str) -> None:
        """A multifd channel was refused: QEMU 7.2 only prints this and keeps waiting
        forever; here the incoming migration fails with the reason."""
        for extra in self._multifd_channels:
            extra.close()
        self._multifd_channels = []
        self.error_desc = desc
        self._close_listener()
        self.set_state("none", "failed")

    def _accept_multifd(self, listener: Listener) -> None:
        """Accept the multifd channels and check their initial packets (multifd.md §2)."""
        count = self.options.param("multifd-channels")
        uuid = self.vm.config.uuid
        local_uuid = uuidlib.UUID(uuid).bytes if uuid else bytes(16)
        by_id: dict[int, Channel] = {}
        pending = self._multifd_channels
        for n in range(count):
            channel = listener.accept()
            pending.append(channel)
            head = bytearray(wire_multifd.INITIAL_PACKET_SIZE)
            try:
                recv_exact(channel, memoryview(head))
                channel_id = wire_multifd.decode_initial_packet(bytes(head), local_uuid, count)
            except (WireError, MultifdError) as err:
                raise WireError(f"failed to receive packet via multifd channel {n}: {err}") from None
            if channel_id in by_id:
                raise WireError(f"multifd: received id '{channel_id}' already setup'")
            by_id[channel_id] = channel
        self._multifd_channels = [by_id[i] for i in range(count)]

    def _load(self, channel: Channel) -> None:
        self._channel = channel
        self.set_state("none", "active")
        self._rp = None
        try:
            self._run_decoder(channel)
            self._finish_load()
            if self._rp is not None:
                self._rp.write(return_path.shut(0))
        except (WireError, LoadError, ChannelError, OSError) as err:
            self.error_desc = f"load of migration failed: {err}"
            if self._rp is not None:
                try:
                    self._rp.write(return_path.shut(1))
                    # Closing with unread input would reset the connection and
                    # could destroy the SHUT before the source reads it.
                    self._rp.drain(timeout=5)
                except ChannelError:
                    pass
            self._close_listener()
            self.set_state("active", "failed")
        finally:
            try:
                channel.close()
            except (ChannelError, OSError):
                pass
            self._channel = None
            self._close_listener()

    def _close_listener(self) -> None:
        """The transport is done with: ``socket-address`` disappears from query-migrate."""
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()

    def _run_decoder(self, channel: Channel) -> None:
        """Read and apply the whole stream (up to EOF and the optional vmdesc)."""
        compress = self.options.cap("compress")
        loader = RamLoader(self.vm.ram_blocks, self.options.param("decompress-threads") if compress else 0)
        try:
            self._run_loader(channel, loader, compress)
        finally:
            loader.close()
            self._multifd_channels = []

    def _run_loader(self, channel: Channel, loader: RamLoader, compress: bool) -> None:
        if self.options.cap("multifd"):
            if not self._multifd_channels:
                raise LoadError("multifd is not supported by current protocol")
            loader.multifd = MultifdReceiver(self._multifd_channels, self.options.param("multifd-compression"),
                                             self.vm.ram_blocks, on_pages=loader.pages_written)
        devices = {(d.idstr, d.instance_id): d for d in self.vm.devices}
        decoder = stream.StreamDecoder({"ram": wire_ram.RamBodyDecoder(loader.known_blocks(), accept_compressed=compress,
                                                                       variable_runs=True),
                                        **device_bodies(devices)})
        self.vm.global_state.runstate = None
        fin = QEMUFileIn(channel)
        seen_eof = False
        while True:
            chunk = fin.read_chunk()
            if not chunk:
                if seen_eof:
                    return
                raise LoadError("unexpected end of migration stream")
            decoder.feed(chunk)
            while (event := decoder.next_event()) is not stream.NEED_DATA:
                if isinstance(event, stream.EOF):
                    seen_eof = True
                elif isinstance(event, stream.VMDescription):
                    return
                else:
                    self._apply(event, loader, channel, devices)

    def _apply(self, event, loader: RamLoader, channel: Channel, devices: dict) -> None:
        if isinstance(event, wire_ram.RamPages):
            loader.load_pages(event)
        elif isinstance(event, wire_ram.RamZeroPages):
            loader.load_zero_pages(event)
        elif isinstance(event, wire_ram.RamXbzrleRun):
            loader.load_xbzrle(event)
        elif isinstance(event, wire_ram.RamCompressedRun):
            loader.load_compressed(event)
        elif isinstance(event, wire_ram.RamEOS):
            loader.end_of_section()
        elif isinstance(event, stream.Configuration):
            self._check_configuration(event)
        elif isinstance(event, vmstate.DeviceState):
            devices[(event.idstr, event.instance_id)].load(event.values)
        elif isinstance(event, stream.Command):
            self._command(event, channel)

    def _check_configuration(self, cfg: "stream.Configuration") -> None:
        machine = self.vm.machine_type
        if cfg.machine != machine:
            raise LoadError(f"Machine type received is '{cfg.machine}' and local is '{machine}'")
        local = self.options.cap("x-ignore-shared")
        remote = "x-ignore-shared" in cfg.capabilities
        if local != remote:
            raise LoadError(
                f"Capability x-ignore-shared is {'on' if local else 'off'}, "
                f"but received capability is {'on' if remote else 'off'}"
            )
        local_uuid = self.vm.config.uuid
        if cfg.uuid is not None and local_uuid is not None:
            received = str(uuidlib.UUID(bytes=bytes(cfg.uuid)))
            if received != local_uuid:
                raise LoadError(f"UUID received is {received} and local is {local_uuid}")

    def _command(self, cmd: "stream.Command", channel: Channel) -> None:
        if cmd.cmd == stream.MIG_CMD_OPEN_RETURN_PATH:
            if self._rp is None:
                if not channel.bidirectional:
                    raise LoadError("Unable to open return-path: the transport is one-way")
                self._rp = channel
        elif cmd.cmd == stream.MIG_CMD_PING:
            value = stream.decode_ping(cmd.payload)
            if self._rp is None:
                raise LoadError(f"CMD_PING (0x{value:x}) received with no return path")
            self._rp.write(return_path.pong(value))
        else:
            raise LoadError(f"vmigrate does not implement the {cmd.name} stream command yet")

    def _finish_load(self) -> None:
        """Run state after a successful load (states.md §9.1), then ``completed``."""
        runstate = self.vm.runstate
        received = self.vm.global_state.runstate
        if received is None or received == "running":
            if runstate.autostart:
                runstate.start()
            else:
                runstate.set("paused")
        else:
            runstate.set(received)
        self._close_listener()
        self.set_state("active", "completed")
