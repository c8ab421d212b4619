"""QMP command handlers: thin functions from checked arguments to the VM.

Handlers register with :func:`command`; the schema decides which commands
exist and checks their arguments before a handler runs, so a handler only
holds behaviour.  The engines below raise :class:`~vmigrate.errors.VMError`
with QEMU's class and text; this layer alone turns it into a QMP error.  A schema command without a handler answers a
:class:`~vmigrate.qmp.errors.NotYetImplemented` error naming the feature.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from vmigrate.errors import VMError
from vmigrate.qapi.schema import load as load_schema
from vmigrate.qmp.errors import NotYetImplemented, QMPError

if TYPE_CHECKING:
    from vmigrate.qmp.protocol import MonitorProtocol
    from vmigrate.vm import VM

log = logging.getLogger(__name__)

Handler = Callable[["VM", dict, "MonitorProtocol"], Any]

HANDLERS: dict[str, Handler] = {}


def command(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[name] = fn
        return fn

    return register


class CommandDispatcher:
    """Connects the QMP protocol to the schema and the handlers of one VM."""

    def __init__(self, vm: "VM") -> None:
        self.vm = vm
        self.schema = load_schema()

    def allows_oob(self, name: str) -> bool | None:
        cmd = self.schema.command(name)
        return None if cmd is None else cmd.allow_oob

    def check_args(self, name: str, args: dict) -> dict:
        return self.schema.check_args(name, args)

    def call(self, name: str, args: dict, monitor: "MonitorProtocol") -> Any:
        args = self.check_args(name, args)
        handler = HANDLERS.get(name)
        if handler is None:
            raise NotYetImplemented(f"the command {name}")
        try:
            return handler(self.vm, args, monitor)
        except QMPError:
            raise
        except VMError as err:
            raise QMPError(err.desc, err.error_class) from None
        except Exception as err:
            # A bug must cost one command, not the monitor: the client gets an answer, the log the trace.
            log.exception("command %s failed", name)
            raise QMPError(f"vmigrate internal error in {name}: {err}") from None


def _load_handlers() -> None:
    """Import the handler modules so their @command decorators run."""
    from vmigrate.commands import block, job, machine, migration, replication  # noqa: F401


_load_handlers()
