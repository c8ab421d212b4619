"""The QMP request/response protocol of one monitor, as QEMU 7.2 speaks it (sans-IO).

:class:`MonitorProtocol` parses bytes from the client into messages and
answers those with the bytes to send back; it knows nothing about sockets.  Command execution is delegated to
a :class:`Dispatcher` so the protocol rules (negotiation mode, request
member checks, OOB, id echo) live in one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmigrate.qapi.keyorder import qdict_key_order
from vmigrate.qapi.model import EMPTY
from vmigrate.qapi.schema import load as load_schema
from vmigrate.qmp.errors import QMPError, command_not_found
from vmigrate.qmp.jsonstream import JSONMessageStream, dumps
from vmigrate.qmp.member_order import output_order, parsed_order, qdict

NEGOTIATION_ERROR = "Expecting capabilities negotiation with 'qmp_capabilities'"


class Dispatcher(Protocol):
    def allows_oob(self, name: str) -> bool | None:
        """None if the command does not exist, else whether it may run out-of-band."""

    def check_args(self, name: str, args: dict) -> dict:
        """Validate and normalise arguments against the schema (raises QMPError)."""

    def call(self, name: str, args: dict, monitor: "MonitorProtocol") -> Any: ...


def timestamp() -> dict:
    now = time.time()
    secs = int(now)
    return {"seconds": secs, "microseconds": int((now - secs) * 1_000_000)}


def event_message(name: str, data: dict | None) -> bytes:
    members: list[tuple[str, Any]] = [("event", name), ("timestamp", timestamp())]
    if data is not None:
        schema = load_schema()
        event = schema.event(name)
        members.append(("data", output_order(schema, event.arg_type or EMPTY, data) if event else data))
    return dumps(qdict(members))


def _return_value(name: str, result: Any) -> Any:
    """The reply value in QEMU's member order.

    ``query-qmp-schema`` is exempt: QEMU serves it from a precomputed literal,
    not through the output visitor, and the introspection code already lays
    it out that way.
    """
    schema = load_schema()
    command = schema.command(name)
    if command is None or name == "query-qmp-schema":
        return result
    return output_order(schema, command.ret_type or EMPTY, result)


def _error(err: QMPError) -> dict:
    return qdict(list(err.to_qmp().items()))


@dataclass
class MonitorProtocol:
    dispatcher: Dispatcher
    greeting_version: dict
    package: str
    oob_offered: bool = True
    negotiated: bool = False
    oob_enabled: bool = False
    #: File descriptors received over SCM_RIGHTS, waiting for ``getfd``.
    pending_fds: list[int] = field(default_factory=list)
    #: Descriptors named by ``getfd`` on this monitor (``fd:NAME`` URIs look here).
    named_fds: dict[str, int] = field(default_factory=dict)
    _stream: JSONMessageStream = field(default_factory=JSONMessageStream)

    def greeting(self) -> bytes:
        caps = ["oob"] if self.oob_offered else []
        version = output_order(load_schema(), "VersionInfo", {"qemu": self.greeting_version, "package": self.package})
        return dumps({"QMP": qdict([("version", version), ("capabilities", caps)])})

    def parse(self, data: bytes) -> list[Any]:
        """Feed client bytes; return the messages (or JSON errors) they complete.

        Touches nothing but this monitor's JSON stream, so the server may run
        it in a worker thread while the loop serves other monitors.
        """
        return self._stream.feed(data)

    def buffered(self) -> int:
        """Bytes of the incomplete message held so far (what the next parse may have to finish)."""
        return self._stream.buffered()

    def answer(self, messages: list[Any]) -> list[bytes]:
        """Handle parsed messages; return the complete responses, in order."""
        return [dumps(r) for r in map(self.handle, messages) if r is not None]

    def handle(self, message: Any) -> dict | None:
        if isinstance(message, QMPError):
            return {"error": _error(message)}
        if not isinstance(message, dict):
            return {"error": _error(QMPError("QMP input must be a JSON object"))}
        try:
            name, oob, args = self._check_request(message)
            result = self._execute(name, oob, args)
            members: list[tuple[str, Any]] = [("return", _return_value(name, {} if result is None else result))]
        except QMPError as err:
            if not self.negotiated and err.cls == "CommandNotFound":
                err = QMPError(NEGOTIATION_ERROR, "CommandNotFound")
            members = [("error", _error(err))]
        if "id" in message:
            members.append(("id", parsed_order(message["id"])))
        return qdict(members)

    def _check_request(self, msg: dict) -> tuple[str, bool, dict]:
        exec_key = None
        # QEMU checks members in QDict order and reports the first bad one.
        for key in qdict_key_order(msg):
            value = msg[key]
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(value, str):
                    raise QMPError(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise QMPError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QMPError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QMPError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise QMPError("QMP input lacks member 'execute'")
        return msg[exec_key], exec_key == "exec-oob", msg.get("arguments", {})

    def _execute(self, name: str, oob: bool, args: dict) -> Any:
        if name == "qmp_capabilities":
            return self._qmp_capabilities(oob, args)
        if not self.negotiated:
            raise command_not_found(name)
        allows_oob = self.dispatcher.allows_oob(name)
        if allows_oob is None:
            raise command_not_found(name)
        if oob and not allows_oob:
            raise QMPError(f"The command {name} does not support OOB")
        return self.dispatcher.call(name, args, self)

    def _qmp_capabilities(self, oob: bool, args: dict) -> dict:
        if oob:
            raise QMPError("The command qmp_capabilities does not support OOB")
        args = self.dispatcher.check_args("qmp_capabilities", args)
        if self.negotiated:
            raise QMPError("Capabilities negotiation is already complete, command ignored", "CommandNotFound")
        enable = args.get("enable", [])
        for cap in enable:
            if cap == "oob" and not self.oob_offered:
                raise QMPError(f"Capability {cap} not available")
        self.oob_enabled = "oob" in enable
        self.negotiated = True
        return {}

