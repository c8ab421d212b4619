"""The incoming migration: QEMU's MigrationIncomingState, its transports and status.

Unlike QEMU 7.2, which exits the whole process when a load fails, a
vmigrate destination stays up in state ``failed`` with an ``error-desc``:
a hostile or broken stream costs the migration, never the process.  This
module accepts the channels, answers the stream's commands (return path,
ping) and decides the run state afterwards; the section loop itself is
:class:`~vmigrate.migration.savevm.LoadVM`.  The configuration is taken
when the main channel arrives, since a destination started with
``--incoming URI`` gets its capabilities over QMP after it began to listen.
"""

from __future__ import annotations

import logging
import select
import threading
import uuid as uuidlib

from vmigrate.machine.announce import AnnounceParameters
from vmigrate.machine.runstate import INMIGRATE_NEXT
from vmigrate.migration.channel import (SOCKET_KINDS, Channel, ChannelError, CommandChannel, FdChannel, Listener,
                                        parse_uri)
from vmigrate.migration.colo import ColoSecondary, ColoState, RamCache
from vmigrate.migration.config import MigrationConfig
from vmigrate.migration.errors import MigrationError
from vmigrate.migration.multifd import MultifdError, recv_exact
from vmigrate.migration.options import MigrationOptions
from vmigrate.migration.postcopy_incoming import PostcopyIncoming, PostcopyState
from vmigrate.migration.port import MigrationHost
from vmigrate.migration.qemu_file import QEMUFileIn
from vmigrate.migration.savevm import LoadContext, LoadError, LoadVM
from vmigrate.migration.status import MigrationStatus, StatusMachine
from vmigrate.migration.tls import TlsError, server_channel
from vmigrate.migration.wire import multifd as wire_multifd
from vmigrate.migration.wire import return_path, stream
from vmigrate.migration.wire.errors import WireError
from vmigrate.trace import trace

log = logging.getLogger(__name__)
S = MigrationStatus
#: Bound on each wait for an fd:/exec: source's first input, so a close is seen.
INPUT_POLL_MS = 200


class IncomingMigration:
    def __init__(self, host: MigrationHost, options: MigrationOptions, colo: ColoState) -> None:
        """*colo* is the process's COLO state: ENABLE_COLO makes this side a secondary."""
        self.host = host
        self.options = options
        self.colo_state = colo
        #: The attempt's load context; its ``colo`` is QEMU's migration_incoming_colo_enabled.
        self._ctx: LoadContext | None = None
        #: The checkpoint loop once the load entered COLO.
        self.colo: ColoSecondary | None = None
        self.status = StatusMachine(host.emit_event, lambda: options.cap("events"))
        self.started = False
        #: Once a single-channel transport (exec:, fd:) was used, multifd is refused.
        self.single_channel = False
        self.listener: Listener | None = None
        self._closing = threading.Event()
        self.error_desc: str | None = None
        #: Why the load was ended from another thread (:meth:`_abort`), which the main channel's error hides.
        self._abort_desc: str | None = None
        self._channel: Channel | None = None
        #: The return path, once the source asked for it (OPEN_RETURN_PATH) over a two-way channel.
        self._rp: Channel | None = None
        #: The source asked for a return path (over a one-way channel its messages go nowhere).
        self._rp_opened = False
        self._thread: threading.Thread | None = None
        #: Multifd channels by id, once each has sent a valid initial packet.
        self._multifd_channels: list[Channel] = []
        #: The attempt's postcopy state (with ``postcopy-ram``).
        self.postcopy: PostcopyIncoming | None = None
        #: The fault thread and the loading thread both write to the return path.
        self._rp_lock = threading.Lock()
        #: ``migrate-recover``'s accepted connections (main, preempt), handed to the paused loading thread.
        self._recovery = threading.Condition()
        self._recovery_channel: Channel | None = None
        self._recovery_preempt: Channel | None = None
        #: The postcopy-preempt channel, accepted after the main one.
        self._preempt_channel: Channel | None = None

    def start(self, uri: str, named_fds: dict[str, int] | None = None) -> None:
        """``migrate-incoming`` / ``--incoming URI`` (docs/qemu/states.md §9).

        *named_fds* are the monitor's ``getfd`` descriptors (none on the command line).
        """
        if self.started:
            raise MigrationError("The incoming migration has already been started")
        if self.host.runstate.state != "inmigrate":
            raise MigrationError("'-incoming' was not specified on the command line")
        # QEMU announces the setup whatever the events capability, without a status change.
        self.host.emit_event("MIGRATION", {"status": S.SETUP.value})
        addr = parse_uri(uri, incoming=True)
        if addr.kind in SOCKET_KINDS:
            self.listener = Listener(addr)
            target = self._accept
        elif addr.kind == "exec":
            self.single_channel = True
            target = lambda: self._load_on_input(CommandChannel(addr.command, outgoing=False))  # noqa: E731
        else:
            fd = named_fds.pop(addr.fdname, None) if named_fds is not None else None
            if fd is None:
                raise MigrationError(f"File descriptor named '{addr.fdname}' has not been found")
            self.single_channel = True
            target = lambda: self._load_on_input(FdChannel(fd))  # noqa: E731
        self.started = True
        self._thread = threading.Thread(target=target, name="incoming", daemon=True)
        self._thread.start()

    def query(self, info: dict) -> None:
        """The destination pass of ``query-migrate``."""
        listener = self.listener
        if listener is not None:
            info["socket-address"] = [listener.address]
        status = self.status.status
        if status == S.NONE:
            return
        info["status"] = status.value
        if status == S.FAILED and self.error_desc:
            info["error-desc"] = self.error_desc
        if self.colo is not None:
            info["x-vmigrate-colo"] = {"checkpoints": self.colo.checkpoints}
        postcopy = self.postcopy
        if status == S.COMPLETED and postcopy is not None and postcopy.blocktime is not None:
            postcopy.blocktime.to_qmp(info)
        if postcopy is not None and postcopy.placing:
            info["x-vmigrate-page-latency"] = postcopy.latency_qmp()

    @property
    def yank_registered(self) -> bool:
        """From ``migrate-incoming`` until the load ends."""
        status = self.status.status
        return status == S.ACTIVE or (self.started and status == S.NONE)

    def close(self) -> None:
        self._closing.set()
        self._close_listener()
        if self._channel is not None:
            self._channel.shutdown()
        for channel in list(self._multifd_channels):
            channel.shutdown()

    # -- the incoming thread ------------------------------------------------

    def _accept(self) -> None:
        """The first connection is the main channel; with multifd, the next N are its channels;
        with postcopy-preempt, the next one is the preempt channel.

        As in QEMU 7.2 the main channel is not read before every multifd
        channel has connected and sent a valid initial packet.
        """
        listener = self.listener
        secured = self._accept_configured(listener)
        if secured is None:
            return
        channel, config = secured
        try:
            if config.caps.multifd:
                self._accept_multifd(listener, config)
            elif config.caps.postcopy_preempt:
                # The second connection is the preempt channel; QEMU reads neither before both are there.
                self._preempt_channel = self._secure(listener.accept(), config)
        except (WireError, MultifdError, TlsError) as err:
            channel.close()
            self._fail_setup(str(err))
            return
        except ChannelError:
            channel.close()
            return
        threading.Thread(target=self._refuse_extra, args=(listener,), name="incoming extra", daemon=True).start()
        self._load(channel, config)

    @staticmethod
    def _refuse_extra(listener: Listener) -> None:
        """Connections beyond the ones the capabilities ask for are closed at once until the load
        ends (QEMU's socket_accept_incoming_migration): a source that opens multifd channels to
        a destination without ``multifd`` then fails on them instead of completing without
        their pages."""
        while True:
            try:
                extra = listener.accept()
            except ChannelError:
                return
            log.warning("Extra incoming migration connection; ignoring")
            extra.close()

    def _load_on_input(self, channel: Channel) -> None:
        """An fd:/exec: source is watched for input (QEMU's G_IO_IN watch): until its first byte
        (or its end) the incoming migration has not started, and ``query-migrate`` says nothing."""
        poller = select.poll()
        poller.register(channel.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        while not poller.poll(INPUT_POLL_MS):
            if self._closing.is_set():
                channel.close()
                return
        secured = self._configure(channel)
        if secured is not None:
            self._load(*secured)

    def _accept_configured(self, listener: Listener) -> tuple[Channel, MigrationConfig] | None:
        """The next connection as a main channel, with the configuration; None once the listener
        closed or the channel was refused."""
        try:
            channel = listener.accept()
        except ChannelError:
            return None
        return self._configure(channel)

    def _configure(self, channel: Channel) -> tuple[Channel, MigrationConfig] | None:
        """The configuration as the main channel arrives, and the channel in TLS if it asks for it;
        None when the handshake failed (the incoming migration has failed then)."""
        config = self.options.snapshot()
        try:
            return self._secure(channel, config), config
        except TlsError as err:
            self._fail_setup(str(err))
            return None

    def _secure(self, channel: Channel, config: MigrationConfig) -> Channel:
        """With ``tls-creds`` set, every accepted channel is a TLS server session
        (QEMU's migration_tls_channel_process_incoming), its client checked by ``tls-authz``
        when set; QEMU 7.2 only prints a failure and keeps waiting, here the incoming
        migration fails with it."""
        params = config.params
        if not params.tls_creds:
            return channel
        try:
            return server_channel(channel, self.host.objects, params.tls_creds, params.tls_authz)
        except TlsError:
            channel.close()
            raise

    def _fail_setup(self, desc: str) -> None:
        """A multifd channel or a TLS session was refused: QEMU 7.2 only prints this and keeps
        waiting forever; here the incoming migration fails with the reason."""
        for extra in self._multifd_channels:
            extra.close()
        self._multifd_channels = []
        self.error_desc = desc
        self._close_listener()
        self.status.transition(S.NONE, S.FAILED)

    def _accept_multifd(self, listener: Listener, config: MigrationConfig) -> None:
        """Accept the multifd channels and check their initial packets (docs/qemu/multifd.md §2)."""
        count = config.params.multifd_channels
        uuid = self.host.uuid
        local_uuid = uuidlib.UUID(uuid).bytes if uuid else bytes(16)
        by_id: dict[int, Channel] = {}
        pending = self._multifd_channels
        if config.params.tls_creds:
            # A source may finish every channel's handshake before it writes on any (vmigrate's
            # does, in one thread): so all the handshakes first, then the initial packets.
            for _ in range(count):
                pending.append(self._secure(listener.accept(), config))
        for n in range(count):
            if n == len(pending):
                pending.append(listener.accept())
            channel = pending[n]
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

    def _abort(self, desc: str) -> None:
        """A multifd channel failed: the main channel's reads stop, and the load fails with *desc*.

        QEMU 7.2's multifd_recv_terminate_threads shuts the multifd channels
        down and leaves the main channel to end when the source notices;
        a source that waits for an idle channel may not for a long time.
        """
        if self._abort_desc is None:
            self._abort_desc = desc
        channel = self._channel
        if channel is not None:
            channel.shutdown()

    def _load(self, channel: Channel, config: MigrationConfig) -> None:
        self._channel = channel
        self._abort_desc = None
        self.status.transition(S.NONE, S.ACTIVE)
        self._rp = None
        self._rp_opened = False
        host = self.host
        postcopy = self.postcopy = PostcopyIncoming(
            host.ram_blocks, self._send_rp, host.vcpus.thread_ids,
            config.caps.postcopy_blocktime) if config.caps.postcopy_ram else None
        if postcopy is not None:
            postcopy.preempt_channel = self._preempt_channel
            postcopy.on_preempt_broken = self.pause
        try:
            host.global_state.runstate = None
            ctx = self._ctx = LoadContext(config, self._multifd_channels, postcopy, abort=self._abort)
            loader = LoadVM(host.sections, ctx, host.machine_type, host.uuid, self._command,
                            self._await_recovery)
            try:
                trace("loadvm_state_setup")
                loader.run(QEMUFileIn(channel))
            finally:
                self._multifd_channels = []
            in_postcopy = postcopy is not None and postcopy.placing
            if postcopy is not None:
                postcopy.end()
            if in_postcopy:
                # The guest runs already: its run state was decided by POSTCOPY_RUN.
                self._close_listener()
                self.status.transition(S.POSTCOPY_ACTIVE, S.COMPLETED)
            elif ctx.colo:
                self._colo(channel, ctx, loader.sections, loader.bodies)
                self._finish_load(config, colo=True)
            else:
                self._finish_load(config)
            if self._rp is not None:
                self._send_rp(return_path.shut(0))
        except Exception as err:
            if not isinstance(err, (WireError, LoadError, ChannelError, OSError)):
                # A bug must cost this migration, not leave it 'active' for ever.
                log.exception("incoming migration failed")
            self.error_desc = f"load of migration failed: {self._abort_desc or err}"
            trace("process_incoming_migration_co_end", error_desc=self.error_desc)
            if postcopy is not None:
                self._close_preempt()
                postcopy.end()
            if self._rp is not None:
                try:
                    self._send_rp(return_path.shut(1))
                    # Closing with unread input would reset the connection and
                    # could destroy the SHUT before the source reads it.
                    self._rp.drain(timeout=5)
                except ChannelError:
                    pass
            self._close_listener()
            self.status.fail()
        finally:
            channel = self._channel
            if channel is not None:
                try:
                    channel.close()
                except (ChannelError, OSError):
                    pass
            self._channel = None
            self._close_preempt()
            self._close_listener()

    def _close_preempt(self) -> None:
        """Close the preempt channel; its loader's error is then expected, not a reason to pause."""
        preempt, self._preempt_channel = self._preempt_channel, None
        if self.postcopy is not None:
            self.postcopy.preempt_channel = None
        if preempt is not None:
            preempt.shutdown()
            try:
                preempt.close()
            except (ChannelError, OSError):
                pass

    def _send_rp(self, message: bytes) -> None:
        rp = self._rp
        if rp is None:
            return
        with self._rp_lock:
            rp.write(message)

    # -- postcopy recovery (docs/qemu/postcopy.md §7) -------------------------------------

    def pause(self) -> None:
        """``migrate-pause`` here (or a broken preempt channel): break the main channel; the loading
        thread pauses on it."""
        channel = self._channel
        if channel is not None:
            channel.shutdown()

    def recover(self, uri: str) -> None:
        """``migrate-recover``: listen for the source's recovery connection."""
        if self.status.status != S.POSTCOPY_PAUSED:
            raise MigrationError("Migrate recover can only be run when postcopy is paused.")
        # As for migrate-incoming, QEMU announces this whatever the events capability.
        self.host.emit_event("MIGRATION", {"status": S.SETUP.value})
        addr = parse_uri(uri, incoming=True)
        if addr.kind not in SOCKET_KINDS:
            raise MigrationError(f"vmigrate recovers postcopy over tcp:, unix: and vsock: only, not '{addr.kind}:'")
        self._close_listener()
        listener = self.listener = Listener(addr)
        threading.Thread(target=self._accept_recovery, args=(listener,), name="incoming recovery",
                         daemon=True).start()

    def _accept_recovery(self, listener: Listener) -> None:
        secured = self._accept_configured(listener)
        if secured is None:
            return
        channel, config = secured
        preempt = None
        if config.caps.postcopy_preempt:
            try:
                preempt = self._secure(listener.accept(), config)
            except (ChannelError, TlsError) as err:
                log.error("postcopy recovery: no preempt channel: %s", err)
                channel.close()
                return
        with self._recovery:
            self._recovery_channel, self._recovery_preempt = channel, preempt
            self._recovery.notify_all()

    def _await_recovery(self, reason: str) -> QEMUFileIn:
        """The stream broke while the guest runs here: pause, and wait for ``migrate-recover``'s connection.

        The guest keeps running; a vCPU that touches a page it lacks waits,
        and its request is sent again once the link is back.
        """
        log.warning("postcopy paused: %s", reason)
        trace("postcopy_pause_incoming", reason=reason)
        old, self._channel, self._rp = self._channel, None, None
        if old is not None:
            old.close()
        self._close_preempt()
        status = self.status.status
        if status == S.POSTCOPY_RECOVER:
            self.status.transition(S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED)
        elif not self.status.transition(S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED):
            raise LoadError(reason)
        with self._recovery:
            self._recovery_channel = None
            while self._recovery_channel is None:
                if self._closing.is_set():
                    raise LoadError(f"postcopy paused and never recovered: {reason}")
                self._recovery.wait(INPUT_POLL_MS / 1000)
            channel, self._recovery_channel = self._recovery_channel, None
            self._preempt_channel, self._recovery_preempt = self._recovery_preempt, None
        self._close_listener()
        self._channel = channel
        if channel.bidirectional:
            self._rp = channel
        self.status.transition(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER)
        return QEMUFileIn(channel)

    def _close_listener(self) -> None:
        """The transport is done with: ``socket-address`` disappears from query-migrate."""
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()

    def _command(self, cmd: "stream.Command") -> None:
        channel = self._channel
        if cmd.cmd == stream.MIG_CMD_OPEN_RETURN_PATH:
            self._rp_opened = True
            if channel.bidirectional:
                self._rp = channel
            else:
                # QEMU opens a return path on any channel; on a one-way one (exec:, a pipe) its
                # messages fail to send and the load goes on (migrate_send_rp_message).
                log.warning("the return path of a one-way channel carries nothing")
        elif cmd.cmd == stream.MIG_CMD_PING:
            value = stream.decode_ping(cmd.payload)
            if not self._rp_opened:
                raise LoadError(f"CMD_PING (0x{value:x}) received with no return path")
            self._send_rp(return_path.pong(value))
        elif cmd.cmd == stream.MIG_CMD_ENABLE_COLO:
            # QEMU 7.2 does not ask for x-colo here (loadvm_process_enable_colo).
            self._ctx.colo = True
        elif cmd.cmd == stream.MIG_CMD_PACKAGED:
            trace("loadvm_handle_cmd_packaged", length=stream.decode_packaged(cmd.payload))
        elif cmd.cmd == stream.MIG_CMD_RECV_BITMAP:
            self._recv_bitmap(stream.decode_recv_bitmap(cmd.payload))
        elif cmd.cmd == stream.MIG_CMD_POSTCOPY_RESUME:
            self._postcopy_resume()
        elif cmd.cmd in (stream.MIG_CMD_POSTCOPY_ADVISE, stream.MIG_CMD_POSTCOPY_RAM_DISCARD,
                         stream.MIG_CMD_POSTCOPY_LISTEN, stream.MIG_CMD_POSTCOPY_RUN):
            self._postcopy_command(cmd)
        else:
            raise LoadError(f"vmigrate does not implement the {cmd.name} stream command yet")

    def _recv_bitmap(self, block: str) -> None:
        """RECV_BITMAP: what this side has received, so the source sends the rest again."""
        if self.status.status != S.POSTCOPY_RECOVER or self.postcopy is None:
            raise LoadError("loadvm_handle_recv_bitmap: only allowed in postcopy-recover")
        self._send_rp(self.postcopy.received_bitmap(block))

    def _postcopy_resume(self) -> None:
        """POSTCOPY_RESUME: back to postcopy-active, RESUME_ACK, then the outstanding requests again."""
        if self.status.status != S.POSTCOPY_RECOVER or self.postcopy is None:
            log.error("loadvm_postcopy_handle_resume: Illegal resume received in %s", self.status.status)
            return
        self.status.transition(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)
        self._send_rp(return_path.resume_ack(1))
        self.postcopy.restart_preempt(self._preempt_channel)
        self.postcopy.resumed()

    def _postcopy_command(self, cmd: "stream.Command") -> None:
        """The postcopy commands (QEMU's loadvm_postcopy_handle_*), with its texts."""
        postcopy = self.postcopy
        if postcopy is None:
            if cmd.cmd == stream.MIG_CMD_POSTCOPY_ADVISE and not cmd.payload:
                return
            if cmd.cmd == stream.MIG_CMD_POSTCOPY_ADVISE:
                raise LoadError("RAM postcopy is disabled but have 16 byte advise")
            raise LoadError(f"CMD_{cmd.name} in wrong postcopy state ({PostcopyState.NONE})")
        if cmd.cmd == stream.MIG_CMD_POSTCOPY_ADVISE:
            postcopy.advise(cmd.payload)
        elif cmd.cmd == stream.MIG_CMD_POSTCOPY_RAM_DISCARD:
            postcopy.discard(cmd.payload)
        elif cmd.cmd == stream.MIG_CMD_POSTCOPY_LISTEN:
            if self._rp is None:
                raise LoadError("postcopy needs a return path to ask for pages")
            postcopy.listen()
            self.status.transition(S.ACTIVE, S.POSTCOPY_ACTIVE)
        else:
            postcopy.run()
            # QEMU's loadvm_postcopy_handle_run_bh: the disks are taken over, the bitmaps still
            # loading start recording, and the guest starts with autostart, whatever run state
            # the source had.
            self._announce()
            self.host.failover.negotiated()
            self.host.block.activate_all()
            self.host.sections.before_vm_start()
            runstate = self.host.runstate
            if runstate.autostart:
                runstate.start()
            else:
                runstate.set("paused")

    def _colo(self, channel: Channel, ctx: LoadContext, sections: dict, bodies: dict) -> None:
        """colo_process_incoming_thread: ``colo`` until a failover, the guest running between
        checkpoints over a copy of the primary's RAM (docs/colo.md); the checkpoints' pages may
        now land on pages the first load wrote."""
        host = self.host
        cache = RamCache(host.ram_blocks, host.vcpus)
        ctx.ram_fresh = False
        self.colo = ColoSecondary(self.colo_state, channel, host.sections, ctx, sections, bodies, host.runstate,
                                  cache)
        self.colo.engage()
        self.status.transition(S.ACTIVE, S.COLO)
        host.runstate.set("colo")
        self.colo.run()

    def _announce(self) -> None:
        """Self-announce with the ``announce-*`` parameters as they are now, not as the attempt
        began (migrate_announce_params), whether or not the guest starts (docs/announce.md)."""
        p = self.options.param
        self.host.announce(AnnounceParameters(p("announce-initial"), p("announce-max"),
                                              p("announce-rounds"), p("announce-step")))

    def _finish_load(self, config: MigrationConfig, colo: bool = False) -> None:
        """Disks, bitmaps and run state after a successful load (docs/qemu/states.md §9.1,
        process_incoming_migration_bh), then ``completed``.

        With ``late-block-activate`` the disks stay inactive unless the guest starts now;
        ``cont`` activates them (docs/block-migration.md §Activation).  After a COLO failover
        (*colo*) the guest starts whatever ``-S`` said (secondary_vm_do_failover), and only
        then does the status leave ``colo``, so a client that sees ``completed`` sees it run.
        """
        runstate = self.host.runstate
        autostart = runstate.autostart or colo
        received = self.host.global_state.runstate
        if received is not None and received not in INMIGRATE_NEXT:
            # QEMU aborts on this transition (runstate_set, softmmu/runstate.c); the load fails here.
            raise LoadError(f"invalid runstate transition: 'inmigrate' -> '{received}'")
        starts = received is None or received == "running"
        if not config.caps.late_block_activate or (autostart and starts):
            self.host.block.activate_all()
        self._announce()
        # The standby's features came with the device state (virtio_net_set_features).
        self.host.failover.negotiated()
        self.host.sections.before_vm_start()
        if received is None or received == "running":
            if autostart:
                runstate.start()
            else:
                runstate.set("paused")
        else:
            runstate.set(received)
        self._close_listener()
        self.status.transition(S.COLO if colo else S.ACTIVE, S.COMPLETED)
