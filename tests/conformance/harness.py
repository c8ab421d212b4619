"""Side-by-side driver: the same QMP traffic to a real QEMU 7.2 and to vmigrate.

A :class:`Pair` is one QEMU and one vmigrate process started with equivalent
options.  Each has a connection on its first monitor negotiated the way the
``qemu.qmp`` library (what a QEMU user would use) negotiates, OOB enabled,
and a second monitor that tests reach with :class:`RawMonitor` for traffic
no client library produces (malformed JSON, non-string ids, an
un-negotiated session).

Answers are compared after masking only what legitimately differs (the build
string, the micro version, timestamps, ephemeral ports), and *exactly*
otherwise: values, error class and text, id echo, and the order of object
members, since vmigrate promises QEMU's bytes, not just QEMU's meaning.
Every vmigrate reply and event must also conform to vmigrate's own schema.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vmigrate.harness.launcher import VMProcess, qemu_argv, qmp_monitor, vmigrate_argv  # noqa: E402
from vmigrate.harness.waiting import wait_for  # noqa: E402
from vmigrate.qapi.schema import load as load_schema  # noqa: E402
from vmigrate.qmp.client import QMPClient, try_connect  # noqa: E402

#: How many request/answer exchanges were compared, by test module.
EXCHANGES: Counter[str] = Counter()

MASK = "<masked>"
RAW_TIMEOUT = 10.0
_pair_numbers = itertools.count()
_sync_ids = itertools.count()


# -- normalisation ------------------------------------------------------------


def mask_version(version: dict, side: str) -> dict:
    """Mask a VersionInfo's build-specific parts, checking what they hide."""
    version = copy.deepcopy(version)
    qemu = version["qemu"]
    assert (qemu["major"], qemu["minor"]) == (7, 2), version
    assert isinstance(qemu["micro"], int)
    if side == "vmigrate":
        assert version["package"].startswith("vmigrate "), version
    qemu["micro"] = MASK
    version["package"] = MASK
    return version


def _mask_socket_addresses(info: dict) -> dict:
    info = copy.deepcopy(info)
    for addr in info.get("socket-address", []):
        if addr.get("type") == "inet":
            assert addr["port"].isdigit() and int(addr["port"]) > 0, addr
            addr["port"] = MASK
    return info


#: Per-command masks of volatile reply parts.
_RETURN_MASKS = {
    "query-version": mask_version,
    "query-migrate": lambda value, side: _mask_socket_addresses(value),
}


def normalise(command: str | None, reply: dict, side: str) -> dict:
    reply = copy.deepcopy(reply)
    mask = _RETURN_MASKS.get(command or "")
    if mask is not None and "return" in reply:
        reply["return"] = mask(reply["return"], side)
    return reply


def key_layout(value: Any) -> Any:
    """The member order of every object in ``value`` (values elided)."""
    if isinstance(value, dict):
        return [(k, key_layout(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [key_layout(v) for v in value]
    return None


def event_layout(event: dict) -> tuple:
    """An event as compared: name, data, and the member order of both."""
    ts = event.get("timestamp")
    assert isinstance(ts, dict) and list(ts) == ["seconds", "microseconds"], event
    assert abs(ts["seconds"] - time.time()) < 600 and 0 <= ts["microseconds"] < 1_000_000, event
    return event["event"], event.get("data"), list(event), key_layout(event.get("data"))


def check_vmigrate_reply(command: str | None, reply: dict) -> None:
    """vmigrate must never send a reply its schema could not have produced."""
    schema = load_schema()
    if "return" in reply and command is not None and schema.command(command) is not None:
        schema.check_return(command, reply["return"])
    if "error" in reply:
        assert set(reply["error"]) == {"class", "desc"}, reply
        assert isinstance(reply["error"]["desc"], str) and reply["error"]["desc"], reply


def check_vmigrate_event(event: dict) -> None:
    load_schema().check_event(event["event"], event.get("data"))


def assert_same(what: Any, qemu: Any, vmigrate: Any) -> None:
    """Equal values, equal member order, equal JSON types (``1`` is not ``1.0``)."""
    assert vmigrate == qemu, f"{what}:\n  qemu:     {qemu!r}\n  vmigrate: {vmigrate!r}"
    assert key_layout(vmigrate) == key_layout(qemu), (
        f"{what}: member order differs\n  qemu:     {json.dumps(qemu)}\n  vmigrate: {json.dumps(vmigrate)}")
    assert json.dumps(vmigrate) == json.dumps(qemu), (
        f"{what}: JSON types differ\n  qemu:     {json.dumps(qemu)}\n  vmigrate: {json.dumps(vmigrate)}")


def count(n: int = 1) -> None:
    """Record ``n`` compared exchanges for the summary line."""
    EXCHANGES[_current_module()] += n


def _current_module() -> str:
    test = os.environ.get("PYTEST_CURRENT_TEST", "?")
    return test.split("::", 1)[0]


# -- raw monitor ----------------------------------------------------------------


class RawMonitor:
    """An un-negotiated session on a QMP monitor: bytes in, parsed messages out.

    Replies are read up to the answer to a marker request sent after the
    test's input, so no read ever waits for a timeout to expire.  Messages are
    parsed keeping member order.
    """

    def __init__(self, path: Path, kind: str) -> None:
        self.kind = kind
        self.client: QMPClient = wait_for(lambda: try_connect(str(path), RAW_TIMEOUT, negotiate=False),
                                          RAW_TIMEOUT, f"monitor socket {path}")
        assert self.client.greeting_line.endswith(b"\r"), self.client.greeting_line
        self.greeting = self.client.greeting

    def close(self) -> None:
        self.client.close()

    def send(self, data: bytes) -> None:
        self.client.send(data)

    def read_line(self) -> bytes:
        try:
            line = self.client.read_line()
        except TimeoutError:
            raise TimeoutError(f"{self.kind}: no complete message in {RAW_TIMEOUT}s") from None
        assert line.endswith(b"\r"), line
        return line[:-1]

    def exchange(self, data: bytes) -> list[tuple[bytes, dict]]:
        """Send ``data``, then a marker; return every message (raw, parsed) before the marker's answer."""
        marker = f"sync-{next(_sync_ids)}"
        self.send(data + b'\n{"execute": "conformance-sync", "id": "%s"}\n' % marker.encode())
        out = []
        deadline = time.monotonic() + RAW_TIMEOUT
        while time.monotonic() < deadline:
            line = self.read_line()
            msg = json.loads(line)
            if msg.get("id") == marker:
                assert msg["error"]["class"] == "CommandNotFound", msg
                return out
            out.append((line, msg))
        raise TimeoutError(f"no answer to the marker after {data!r}")


# -- processes ---------------------------------------------------------------------


# -- the pair ---------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    """A disk both sides open, each its own copy: ``-blockdev`` with a node name, or ``-drive``
    with a device id (and a node name if given)."""

    node_name: str | None
    fmt: str = "qcow2"
    size: str = "64M"
    device: str | None = None
    read_only: bool = False

    def image(self, directory: Path, kind: str) -> Path:
        path = directory / f"{kind}-{self.node_name or self.device}.{self.fmt}"
        if not path.exists():
            subprocess.run(["qemu-img", "create", "-q", "-f", self.fmt, str(path), self.size], check=True)
        return path

    def qemu(self, directory: Path) -> list[str]:
        path = self.image(directory, "qemu")
        if self.device is None:
            ro = ",read-only=on" if self.read_only else ""
            return ["-blockdev", f"driver={self.fmt},node-name={self.node_name}{ro},file.driver=file,"
                    f"file.filename={path}"]
        node = f",node-name={self.node_name}" if self.node_name else ""
        ro = ",readonly=on" if self.read_only else ""
        return ["-drive", f"if=none,id={self.device},file={path},format={self.fmt}{node}{ro}"]

    def vmigrate(self, directory: Path) -> list[str]:
        path = self.image(directory, "vmigrate")
        if self.device is None:
            ro = ",read-only=on" if self.read_only else ""
            return ["--blockdev", f"driver={self.fmt},node-name={self.node_name},file={path}{ro}"]
        node = f",node-name={self.node_name}" if self.node_name else ""
        ro = ",readonly=on" if self.read_only else ""
        return ["--drive", f"if=none,id={self.device},file={path},format={self.fmt}{node}{ro}"]


@dataclass
class Options:
    """VM options both programs understand, spelled once for both command lines."""

    name: str | None = None
    uuid: str | None = None
    paused: bool = False
    incoming: str | None = None
    disks: tuple[Disk, ...] = ()
    #: Where the disks' images go (set by Pair.start).
    directory: Path | None = None

    def qemu(self) -> list[str]:
        args: list[str] = []
        for disk in self.disks:
            args += disk.qemu(self.directory)
        if self.name is not None:
            args += ["-name", self.name]
        if self.uuid is not None:
            args += ["-uuid", self.uuid]
        if self.paused:
            args.append("-S")
        if self.incoming is not None:
            args += ["-incoming", self.incoming]
        return args

    def vmigrate(self) -> list[str]:
        # The software vCPU is the counterpart of QEMU's default TCG: same
        # devices in the stream, no KVM dirty ring.
        args = ["-m", "64M", "--accel", "soft"]
        for disk in self.disks:
            args += disk.vmigrate(self.directory)
        if self.name is not None:
            args += ["--name", self.name]
        if self.uuid is not None:
            args += ["--uuid", self.uuid]
        if self.paused:
            args.append("-S")
        if self.incoming is not None:
            args += ["--incoming", self.incoming]
        return args


@dataclass
class Side:
    kind: str
    proc: VMProcess
    raw_path: Path


@dataclass
class Pair:
    """One QEMU and one vmigrate with the same options, driven in lockstep."""

    qemu: Side
    vmigrate: Side
    options: Options = field(default_factory=Options)

    @classmethod
    def start(cls, directory: Path, options: Options | None = None) -> "Pair":
        options = options or Options()
        options.directory = directory
        n = next(_pair_numbers)
        sides = {}
        for kind in ("qemu", "vmigrate"):
            sock = directory / f"{kind}{n}.sock"
            raw = directory / f"{kind}{n}-raw.sock"
            if kind == "qemu":
                argv = qemu_argv(sock, *qmp_monitor(raw), *options.qemu())
            else:
                argv = vmigrate_argv(sock, "--qmp", f"unix:{raw}", *options.vmigrate())
            try:
                proc = VMProcess(argv, sock, directory / f"{kind}{n}.log", qmp_capabilities=("oob",))
            except BaseException:
                for side in sides.values():
                    side.proc.close()
                raise
            sides[kind] = Side(kind, proc, raw)
        pair = cls(sides["qemu"], sides["vmigrate"], options)
        # A RESUME that QEMU wrote ahead of its greeting (a start-up race of its own) is no answer.
        sides["qemu"].proc.qmp.events.clear()
        try:
            assert_same("greeting", pair._greeting("qemu"), pair._greeting("vmigrate"))
        except BaseException:
            pair.close()
            raise
        return pair

    def _greeting(self, kind: str) -> dict:
        greeting = copy.deepcopy(getattr(self, kind).proc.qmp.greeting)
        greeting["QMP"]["version"] = mask_version(greeting["QMP"]["version"], kind)
        return greeting

    def sides(self) -> tuple[Side, Side]:
        return self.qemu, self.vmigrate

    def close(self) -> None:
        for side in self.sides():
            side.proc.close()

    # -- library-driven exchanges ------------------------------------------

    def send(self, message: dict) -> tuple[dict, dict]:
        """Send one request to both; return the normalised (qemu, vmigrate) replies."""
        command = message.get("execute", message.get("exec-oob"))
        replies = []
        for side in self.sides():
            reply = side.proc.qmp.request(copy.deepcopy(message))
            if side.kind == "vmigrate":
                check_vmigrate_reply(command, reply)
            replies.append(normalise(command, reply, side.kind))
        count()
        return replies[0], replies[1]

    def same(self, command: str, arguments: dict | None = None, **extra: Any) -> dict:
        """Execute on both, assert identical answers; return QEMU's (normalised) reply."""
        message: dict = {"execute": command, **extra}
        if arguments is not None:
            message["arguments"] = arguments
        qemu, vm = self.send(message)
        assert_same(message, qemu, vm)
        return qemu

    def same_events(self) -> list[tuple]:
        """Drain both event queues (events that came with the replies so far); compare them."""
        got = []
        for side in self.sides():
            events = side.proc.events()
            if side.kind == "vmigrate":
                for e in events:
                    check_vmigrate_event(e)
            got.append([event_layout(e) for e in events])
        assert got[1] == got[0], f"events:\n  qemu:     {got[0]}\n  vmigrate: {got[1]}"
        return [(name, data) for name, data, _, _ in got[0]]

    def wait_events(self, names: list[str], timeout: float = 10.0) -> list[tuple]:
        """Collect events on both until each has seen ``len(names)`` events; compare them.

        ``names`` is what QEMU is expected to send; vmigrate must send the same.
        """
        return self.events_until(lambda seen: len(seen) >= len(names), timeout, expect=names)

    def events_until(self, done, timeout: float = 10.0, expect: list[str] | None = None,
                     compare: bool = True) -> Any:
        """Collect events on each side until ``done(list of (event, data))`` holds.

        With ``compare`` the two sequences must be equal and QEMU's is returned;
        without, both are returned (for orders decided by a race in QEMU itself).
        """
        got = []
        for side in self.sides():
            events: list[dict] = []
            deadline = time.monotonic() + timeout
            while not done([(e["event"], e.get("data")) for e in events]):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{side.kind}: events so far {events}")
                events += side.proc.qmp.poll_events(min(left, 1.0))
            if side.kind == "vmigrate":
                for e in events:
                    check_vmigrate_event(e)
            got.append([event_layout(e) for e in events])
        seen = [[(name, data) for name, data, _, _ in g] for g in got]
        if not compare:
            return seen[0], seen[1]
        assert got[1] == got[0], f"events:\n  qemu:     {got[0]}\n  vmigrate: {got[1]}"
        if expect is not None:
            assert [name for name, _ in seen[0]] == expect, seen[0]
        return seen[0]

    # -- raw exchanges -------------------------------------------------------

    def raw(self) -> "RawPair":
        return RawPair(self)


class RawPair:
    """A raw connection to the second monitor of both processes."""

    def __init__(self, pair: Pair) -> None:
        self.monitors: list[RawMonitor] = []
        try:
            for side in pair.sides():
                self.monitors.append(RawMonitor(side.raw_path, side.kind))
        except BaseException:
            self.close()
            raise
        greetings = [copy.deepcopy(m.greeting) for m in self.monitors]
        for g, kind in zip(greetings, ("qemu", "vmigrate")):
            g["QMP"]["version"] = mask_version(g["QMP"]["version"], kind)
        assert_same("greeting", greetings[0], greetings[1])

    def __enter__(self) -> "RawPair":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for m in self.monitors:
            m.close()

    def send(self, data: bytes) -> None:
        """Send bytes to both without waiting for answers (e.g. half a message)."""
        for m in self.monitors:
            m.send(data)

    def same(self, data: bytes | str | dict, command: str | None = None) -> list[dict]:
        """Send the same bytes to both; assert identical answers (events included).

        ``command`` names the command whose replies are schema-checked.
        """
        if isinstance(data, dict):
            command = command or data.get("execute") or data.get("exec-oob")
        if not isinstance(data, (bytes, str)):
            data = json.dumps(data)
        if isinstance(data, str):
            data = data.encode()
        answers = [m.exchange(data) for m in self.monitors]
        for _, msg in answers[1]:
            if "event" in msg:
                check_vmigrate_event(msg)
            else:
                check_vmigrate_reply(command, msg)
        strip = [[event_layout(m) if "event" in m else m for _, m in a] for a in answers]
        assert_same(data, strip[0], strip[1])
        lines = [[line for line, m in a if "event" not in m] for a in answers]
        assert lines[1] == lines[0], f"{data!r}: bytes differ\n  qemu:     {lines[0]}\n  vmigrate: {lines[1]}"
        count()
        return [m for _, m in answers[0]]
