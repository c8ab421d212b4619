"""Record QEMU 7.2's QAPI behaviour from the installed binary as test vectors.

    python tools/record_qemu_qapi.py [schema] [args] [replies]

``schema`` writes ``tests/unit/vectors/qemu72-qmp-schema.json.gz`` (the raw
``query-qmp-schema`` reply, key order as sent).  ``args`` sends the argument
cases below to a fresh ``-M none`` QEMU and writes every request with QEMU's
reply to ``tests/unit/vectors/qemu72-qmp-args.json``; for accepted requests
that store a value it also records what ``query-migrate-parameters`` then
reports.  ``replies`` records real replies and events (see
``record_replies``) to ``tests/unit/vectors/qemu72-qmp-replies.json``.
The cases are chosen so that none has an effect outside the
throwaway QEMU process (every request QEMU might accept is harmless).
"""

from __future__ import annotations

import gzip
import json
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from vmigrate.harness.launcher import VMProcess, qemu_argv
from vmigrate.harness.waiting import wait_for

VECTORS = Path(__file__).resolve().parent.parent / "tests" / "unit" / "vectors"
SCHEMA_VECTOR = VECTORS / "qemu72-qmp-schema.json.gz"
ARGS_VECTOR = VECTORS / "qemu72-qmp-args.json"
REPLIES_VECTOR = VECTORS / "qemu72-qmp-replies.json"


@contextmanager
def qemu_monitor() -> Iterator[VMProcess]:
    """A throwaway ``-M none`` QEMU with a negotiated QMP connection."""
    with tempfile.TemporaryDirectory() as tmp:
        sock = Path(tmp) / "qmp.sock"
        with VMProcess(qemu_argv(sock), sock, Path(tmp) / "qemu.log") as vm:
            yield vm


def request(vm: VMProcess, command: str, arguments: dict | None = None) -> dict:
    """QEMU's whole reply to *command*, sent without an id (as the vectors record it)."""
    message: dict = {"execute": command}
    if arguments is not None:
        message["arguments"] = arguments
    return vm.qmp.request(message)


def drain(vm: VMProcess) -> None:
    """Queue the events QEMU sends until it closes the connection (after ``quit``)."""
    while True:
        try:
            vm.qmp.events.append(vm.qmp.read_message())
        except (ConnectionError, TimeoutError):
            return


def record_schema() -> None:
    with qemu_monitor() as qemu:
        reply = qemu.cmd("query-qmp-schema")
    data = json.dumps(reply, separators=(",", ":")).encode()
    with open(SCHEMA_VECTOR, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(data)
    print(f"{SCHEMA_VECTOR}: {len(reply)} entries, {len(data)} bytes uncompressed")


def _case(execute: str, arguments: dict | None = None) -> dict:
    return {"execute": execute, "arguments": arguments}


def handwritten_cases() -> list[dict]:
    """One or more requests per visitor error kind, plus precedence cases."""
    mig = "migrate"
    msp = "migrate-set-parameters"
    msc = "migrate-set-capabilities"
    cap = {"capability": "xbzrle", "state": True}
    node = {"node-name": "n", "alias": "a", "bitmaps": []}
    return [
        # missing / wrong type / unexpected, and which one wins
        _case(mig, {}),
        _case(mig),
        _case(mig, {"uri": 1}),
        _case(mig, {"uri": None}),
        _case(mig, {"uri": "exec:false", "bogus": 1}),
        _case(mig, {"bogus": 1}),
        _case(mig, {"uri": 5, "blk": "x"}),
        _case(mig, {"uri": "exec:false", "blk": "yes"}),
        _case(mig, {"uri": "exec:false", "blk": None}),
        _case(mig, {"uri": "exec:false", "detach": "x", "blk": 1}),
        _case(mig, {"uri": "exec:false", "resume": 0}),
        _case("migrate-incoming", {"uri": []}),
        _case("migrate-recover", {"uri": {}}),
        _case("query-status", {"a": 1}),
        _case("query-migrate", {"detail": True}),
        _case("getfd", {}),
        _case("getfd", {"fdname": False}),
        _case("xen-set-replication", {"enable": True}),
        _case("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": "x"}),
        _case("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": 1.5}),
        _case("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": 9223372036854775808}),
        _case("client_migrate_info", {"protocol": "spice", "hostname": "h", "port": 18446744073709551616}),
        # lists, nested objects, enums
        _case(msc, {}),
        _case(msc, {"capabilities": {}}),
        _case(msc, {"capabilities": [1]}),
        _case(msc, {"capabilities": [None]}),
        _case(msc, {"capabilities": [{"capability": "foo", "state": True}]}),
        _case(msc, {"capabilities": [{"capability": 5, "state": True}]}),
        _case(msc, {"capabilities": [{"capability": "xbzrle"}]}),
        _case(msc, {"capabilities": [{"state": True}]}),
        _case(msc, {"capabilities": [{"capability": "xbzrle", "state": 1}]}),
        _case(msc, {"capabilities": [cap, {"capability": "events", "state": True, "x": 1}]}),
        _case(msc, {"capabilities": [cap, cap, {"capability": "bogus", "state": 1}]}),
        _case(msc, {"capabilities": [{"capability": "xbzrle", "state": True, "x": 1}], "y": 2}),
        _case(msc, {"capabilities": [cap]}),
        _case(msc, {"capabilities": []}),
        _case("migrate-continue", {"state": "foo"}),
        _case("migrate-continue", {"state": None}),
        _case("qmp_capabilities", {"enable": ["foo"]}),
        _case("qmp_capabilities", {"enable": "oob"}),
        _case("qmp_capabilities", {"enable": [1]}),
        _case("qmp_capabilities", {"enable": ["oob", None]}),
        _case("qmp_capabilities", {"enable": ["oob"], "x": 1}),
        _case("calc-dirty-rate", {"calc-time": "x"}),
        _case("calc-dirty-rate", {"calc-time": 1.0}),
        _case("calc-dirty-rate", {"calc-time": 9223372036854775808}),
        _case("calc-dirty-rate", {"calc-time": -9223372036854775809}),
        _case("calc-dirty-rate", {"calc-time": 1, "mode": "bad"}),
        _case("calc-dirty-rate", {"calc-time": 1, "sample-pages": True}),
        _case("set-vcpu-dirty-limit", {"dirty-rate": "x"}),
        _case("set-vcpu-dirty-limit", {"dirty-rate": 1.5}),
        _case("set-vcpu-dirty-limit", {"cpu-index": "x", "dirty-rate": 1}),
        _case("cancel-vcpu-dirty-limit", {"cpu-index": None}),
        _case("snapshot-save", {"job-id": "j", "tag": "t", "vmstate": "v", "devices": "x"}),
        _case("snapshot-save", {"job-id": "j", "tag": "t", "vmstate": "v", "devices": ["a", 1]}),
        _case("snapshot-delete", {"job-id": "j", "tag": "t"}),
        # unions
        _case("yank", {}),
        _case("yank", {"instances": [{"type": "chardev"}]}),
        _case("yank", {"instances": [{"type": "foo"}]}),
        _case("yank", {"instances": [{"id": "x"}]}),
        _case("yank", {"instances": [{"type": "migration", "id": "x"}]}),
        _case("yank", {"instances": [{"type": "block-node", "node-name": 1}]}),
        _case("yank", {"instances": [{"type": 7}]}),
        _case("yank", {"instances": []}),
        # boxed arguments
        _case("announce-self", {}),
        _case("announce-self", {"initial": 1, "max": 1, "rounds": 1, "step": 1, "interfaces": "x"}),
        _case("announce-self", {"initial": 1, "max": "1", "rounds": 1, "step": 1}),
        _case(msp, {"bogus": 1}),
        _case(msp, {"bogus": 1, "compress-level": "x"}),
        _case(msp, {"compress-threads": 256}),
        _case(msp, {"compress-threads": -1}),
        _case(msp, {"compress-level": "x"}),
        _case(msp, {"compress-level": 1.5}),
        _case(msp, {"compress-level": 9223372036854775808}),
        _case(msp, {"multifd-channels": 256}),
        _case(msp, {"cpu-throttle-initial": 300}),
        _case(msp, {"throttle-trigger-threshold": "1"}),
        _case(msp, {"x-checkpoint-delay": 4294967296}),
        _case(msp, {"x-checkpoint-delay": -1}),
        _case(msp, {"max-bandwidth": 18446744073709551616}),
        _case(msp, {"max-bandwidth": -9223372036854775809}),
        _case(msp, {"max-bandwidth": True}),
        _case(msp, {"max-bandwidth": "1"}),
        _case(msp, {"downtime-limit": None}),
        _case(msp, {"multifd-compression": "foo"}),
        _case(msp, {"multifd-compression": 1}),
        _case(msp, {"tls-authz": 1}),
        _case(msp, {"tls-creds": []}),
        _case(msp, {"tls-creds": {}}),
        _case(msp, {"tls-hostname": True}),
        _case(msp, {"block-incremental": 1}),
        _case(msp, {"compress-threads": 300, "compress-level": "x"}),
        _case(msp, {"block-bitmap-mapping": {}}),
        _case(msp, {"block-bitmap-mapping": [{}]}),
        _case(msp, {"block-bitmap-mapping": [{**node, "bitmaps": [{"name": "b", "alias": "c", "x": 1}]}]}),
        _case(msp, {"block-bitmap-mapping": [{**node, "bitmaps": [
            {"name": "b", "alias": "c", "transform": {"persistent": 1}}]}]}),
        _case(msp, {"block-bitmap-mapping": [{**node, "bitmaps": [
            {"name": "b", "alias": "c", "transform": {"x": 1}}]}]}),
        _case(msp, {"block-bitmap-mapping": [node, {**node, "bitmaps": [{"name": "b"}]}]}),
        # accepted: harmless, and the stored value shows QEMU's normalisation
        _case(msp, {"max-bandwidth": -1}),
        _case(msp, {"max-postcopy-bandwidth": -5}),
        _case(msp, {"max-postcopy-bandwidth": -9223372036854775808}),
        _case(msp, {"max-postcopy-bandwidth": 18446744073709551615}),
        _case(msp, {"x-checkpoint-delay": 4294967295}),
        _case(msp, {"tls-creds": None, "tls-hostname": "h", "tls-authz": None}),
        _case(msp, {"multifd-compression": "zstd"}),
        _case(msp, {}),
        _case(msp),
    ]


def _valid_value(schema, ref: str, rng: random.Random):
    """A value of type ``ref`` the visitor accepts (for filler members)."""
    from vmigrate.qapi.model import AlternateType, BuiltinType, EnumType

    if ref.startswith("["):
        return []
    t = schema.type(ref)
    if isinstance(t, EnumType):
        return t.values[0]
    if isinstance(t, AlternateType):
        return "a"
    assert isinstance(t, BuiltinType), ref
    return {"str": "a", "bool": rng.random() < 0.5}.get(t.name, rng.randint(0, 200))


def _random_key(rng: random.Random) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz-_0123456789"
    key = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
    return key + ("é" if rng.random() < 0.1 else "")


def key_order_cases(count: int = 160, seed: int = 72) -> list[dict]:
    """Requests with several unknown members among known ones: QEMU names
    one of them, chosen by its hash tables; these pin that choice down."""
    from vmigrate.qapi.schema import load

    schema = load()
    rng = random.Random(seed)
    msp = schema.members("MigrateSetParameters")
    cases = []
    for i in range(count):
        kind = i % 4
        unknown = {_random_key(rng): 1 for _ in range(rng.randint(2, 9))}
        if kind == 0:
            cases.append(_case("query-status", unknown))
            continue
        if kind == 1:
            known = {m.name: _valid_value(schema, m.type, rng) for m in rng.sample(msp, rng.randint(0, len(msp)))}
            args = {**known, **unknown}
            items = list(args.items())
            rng.shuffle(items)
            cases.append(_case("migrate-set-parameters", dict(items)))
            continue
        if kind == 2:
            cap = {"capability": "events", "state": True, **unknown}
            cases.append(_case("migrate-set-capabilities", {"capabilities": [cap]}))
            continue
        many = {_random_key(rng): 0 for _ in range(rng.randint(10, 40))}
        cases.append(_case("query-migrate", many))
    return cases


def record_args() -> None:
    cases = handwritten_cases() + key_order_cases()
    out = []
    with qemu_monitor() as qemu:
        for case in cases:
            reply = request(qemu, case["execute"], case["arguments"])
            entry = {**case, "reply": reply}
            if case["execute"] == "migrate-set-parameters" and "return" in reply:
                stored = qemu.cmd("query-migrate-parameters")
                entry["stored"] = {k: stored[k] for k in case["arguments"] or {} if k in stored}
            out.append(entry)
            print(json.dumps(entry)[:200])
        version = qemu.qmp.greeting["QMP"]["version"]
    doc = {"qemu": version, "cases": out}
    with open(ARGS_VECTOR, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=0, ensure_ascii=False)
        f.write("\n")
    print(f"{ARGS_VECTOR}: {len(out)} cases")


QUERIES = (
    "query-status", "query-version", "query-commands", "query-name", "query-uuid",
    "query-yank", "query-migrate", "query-migrate-capabilities",
    "query-migrate-parameters", "query-colo-status", "query-dirty-rate",
    "query-vcpu-dirty-limit", "query-xen-replication-status",
)


def record_replies() -> None:
    """Real replies and events, to prove the reply checker accepts them: the
    queries on a fresh VM, then stop/cont, a migration to /dev/null with
    events on, a dirty-rate measurement, and quit."""
    replies: dict[str, list] = {}
    with qemu_monitor() as qemu:

        def query(command: str) -> dict:
            reply = request(qemu, command)
            replies.setdefault(command, []).append(reply["return"])
            return reply["return"]

        for command in QUERIES:
            query(command)
        request(qemu, "stop")
        request(qemu, "cont")
        request(qemu, "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        request(qemu, "migrate", {"uri": "exec:cat > /dev/null"})
        wait_for(lambda: query("query-migrate").get("status") in ("completed", "failed"), 60, "the migration",
                 interval=0.2)
        query("query-status")
        request(qemu, "calc-dirty-rate", {"calc-time": 1})
        wait_for(lambda: query("query-dirty-rate")["status"] == "measured", 10, "the dirty rate", interval=0.2)
        request(qemu, "quit")
        drain(qemu)
        version = qemu.qmp.greeting["QMP"]["version"]
        events = list(qemu.qmp.events)
    doc = {"qemu": version, "replies": replies, "events": events}
    with open(REPLIES_VECTOR, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=0)
        f.write("\n")
    print(f"{REPLIES_VECTOR}: {sum(map(len, replies.values()))} replies, {len(events)} events")


def main(argv: list[str]) -> int:
    VECTORS.mkdir(parents=True, exist_ok=True)
    what = argv[1:] or ["schema", "args", "replies"]
    if "schema" in what:
        record_schema()
    if "args" in what:
        record_args()
    if "replies" in what:
        record_replies()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
