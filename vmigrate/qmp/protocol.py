"""The QMP request/response protocol of one monitor, as QEMU 7.2 speaks it (sans-IO).

:class:`MonitorProtocol` takes bytes from the client and returns the bytes to
send back; it knows nothing about sockets.  Command execution is delegated to
a :class:`Dispatcher` so the protocol rules (negotiation mode, request
member checks, OOB, id echo) live in one place.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from vmigrate.qmp.errors import QMPError, command_not_found
from vmigrate.qmp.jsonstream import JSONMessageStream, dumps

NEGOTIATION_ERROR = "Expecting capabilities negotiation with 'qmp_capabilities'"


class Dispatcher(Protocol):
    def allows_oob(self, name: str) -> bool | None:
        """None if the command does not exist, else whether it may run out-of-band."""

    def check_args(self, name: str, args: dict) -> dict:
        """Validate and normalise arguments against the schema (raises QMPError)."""

    def call(self, name: str, args: dict, monitor: "MonitorProtocol") -> Any: ...


def _tdb_hash(key: str) -> int:
    """The string hash QEMU's QDict buckets by; it fixes member iteration order."""
    data = key.encode()
    value = (0x238F13AF * len(data)) & 0xFFFFFFFF
    for i, b in enumerate(data):
        value = (value + (b << (i * 5 % 24))) & 0xFFFFFFFF
    return (1103515243 * value + 12345) & 0xFFFFFFFF


def qdict_order(keys: list[str]) -> list[str]:
    """Order in which QEMU iterates a QDict built by inserting *keys* in order.

    512 buckets walked in order; within a bucket the newest entry comes first.
    Matters because QEMU reports the first offending request member it meets.
    """
    indexed = [(_tdb_hash(k) % 512, -i, k) for i, k in enumerate(keys)]
    return [k for _, _, k in sorted(indexed)]


def timestamp() -> dict:
    now = time.time()
    secs = int(now)
    return {"seconds": secs, "microseconds": int((now - secs) * 1_000_000)}


def event_message(name: str, data: dict | None) -> bytes:
    msg: dict = {"event": name}
    if data is not None:
        msg["data"] = data
    msg["timestamp"] = timestamp()
    return dumps(msg)


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
        return dumps({"QMP": {"version": {"qemu": self.greeting_version, "package": self.package}, "capabilities": caps}})

    def receive(self, data: bytes) -> list[bytes]:
        """Feed client bytes; return the complete responses, in order."""
        return [dumps(r) for r in map(self.handle, self._stream.feed(data)) if r is not None]

    def handle(self, message: Any) -> dict | None:
        if isinstance(message, QMPError):
            return {"error": message.to_qmp()}
        if not isinstance(message, dict):
            return {"error": QMPError("QMP input must be a JSON object").to_qmp()}
        try:
            name, oob, args = self._check_request(message)
            result = self._execute(name, oob, args)
            response: dict = {"return": {} if result is None else result}
        except QMPError as err:
            if not self.negotiated and err.cls == "CommandNotFound":
                err = QMPError(NEGOTIATION_ERROR, "CommandNotFound")
            response = {"error": err.to_qmp()}
        if "id" in message:
            response["id"] = message["id"]
        return response

    def _check_request(self, msg: dict) -> tuple[str, bool, dict]:
        exec_key = None
        for key in qdict_order(list(msg)):
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

