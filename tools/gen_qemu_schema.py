"""Derive the schema files of commands outside the seed from QEMU 7.2's introspection.

``vmigrate/qapi/qom.json`` holds ``object-add`` and ``object-del``, whose
``ObjectOptions`` reaches into a dozen of QEMU's schema files (qom, crypto,
block-core, net, machine...); ``vmigrate/qapi/block.json`` holds the block
and job commands and events that disks and snapshot jobs answer.  The seed
includes none of them.  The running QEMU describes the same types through
``query-qmp-schema``; this turns that introspection back into definitions
(structure only: names are invented, documentation is not copied), so
vmigrate's introspection of these commands equals QEMU's.  Run:
``python tools/gen_qemu_schema.py GROUP OUT`` (GROUP: qom or block) with
``qemu-system-x86_64`` 7.2 on the PATH.
"""

from __future__ import annotations

import json
import subprocess
import sys

#: The commands and events of each file, in QEMU's schema order (which its introspection keeps).
GROUPS: dict[str, tuple[str, ...]] = {
    "qom": ("object-add", "object-del"),
    "block": ("query-block", "query-named-block-nodes",
              "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
              "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "x-debug-block-dirty-bitmap-sha256",
              "JOB_STATUS_CHANGE",
              "job-pause", "job-resume", "job-cancel", "job-complete", "job-dismiss", "job-finalize",
              "query-jobs"),
}


#: Commands QEMU allows before machine creation (introspection does not say, so it is listed).
PRECONFIG = {"object-add", "object-del", "query-block", "query-named-block-nodes",
             "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
             "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"}


def introspect(binary: str = "qemu-system-x86_64") -> list[dict]:
    """QEMU's ``query-qmp-schema`` over a QMP monitor on stdio."""
    script = "".join(json.dumps(m) + "\n" for m in (
        {"execute": "qmp_capabilities"}, {"execute": "query-qmp-schema", "id": "schema"}, {"execute": "quit"}))
    out = subprocess.run([binary, "-M", "none", "-nodefaults", "-display", "none", "-qmp", "stdio"],
                         input=script, capture_output=True, text=True, timeout=60, check=True).stdout
    for line in out.splitlines():
        reply = json.loads(line)
        if reply.get("id") == "schema":
            return reply["return"]
    raise RuntimeError("no query-qmp-schema reply")


def definitions(schema: list[dict], entities: tuple[str, ...]) -> list[dict]:
    by_name = {e["name"]: e for e in schema}
    names: dict[str, str] = {}
    out: list[dict] = []

    def ref(name: str, hint: str) -> str | list:
        entry = by_name[name]
        meta = entry["meta-type"]
        if meta == "builtin":
            return name
        if meta == "array":
            return [ref(entry["element-type"], hint)]
        if name not in names:
            names[name] = hint
            define(entry, hint)
        return names[name]

    def member(m: dict, owner: str) -> tuple[str, object]:
        key = m["name"] if "default" not in m else "*" + m["name"]
        value = ref(m["type"], "ObjectType" if m["name"] == "qom-type" else f"{owner}-{m['name']}")
        if m.get("features"):
            value = {"type": value, "features": m["features"]}
        return key, value

    def define(entry: dict, name: str) -> None:
        meta = entry["meta-type"]
        if meta == "enum":
            values = [{"name": v["name"], "features": v["features"]} if v.get("features") else v["name"]
                      for v in entry["members"]]
            out.append({"enum": name, "data": values})
            return
        if meta == "alternate":
            out.append({"alternate": name, "data": {f"b{i}": ref(m["type"], f"{name}-{i}")
                                                      for i, m in enumerate(entry["members"])}})
            return
        members = dict(member(m, name) for m in entry["members"])
        if "tag" in entry:
            data = {v["case"]: ref(v["type"], f"{name}-{v['case']}") for v in entry["variants"]
                    if by_name[v["type"]]["members"] or by_name[v["type"]].get("variants")}
            out.append({"union": name, "base": members, "discriminator": entry["tag"], "data": data})
        else:
            out.append({"struct": name, "data": members})

    for name in entities:
        entry = by_name[name]
        arg = by_name[entry["arg-type"]]
        if entry["meta-type"] == "event":
            out.append({"event": name, "data": dict(member(m, name) for m in arg["members"])}
                       if arg["members"] else {"event": name})
            continue
        command = name
        expr: dict = {"command": command}
        if "tag" in arg:
            expr.update({"data": ref(entry["arg-type"], "ObjectOptions"), "boxed": True})
        elif arg["members"]:
            expr["data"] = dict(member(m, command) for m in arg["members"])
        if by_name[entry["ret-type"]]["meta-type"] != "object" or by_name[entry["ret-type"]]["members"]:
            expr["returns"] = ref(entry["ret-type"], f"{command}-ret")
        if entry.get("allow-oob"):
            expr["allow-oob"] = True
        if entry.get("features"):
            expr["features"] = entry["features"]
        expr["allow-preconfig"] = command in PRECONFIG
        out.append(expr)
    return out


def main(argv: list[str]) -> int:
    with open(argv[2], "w") as f:
        json.dump(definitions(introspect(), GROUPS[argv[1]]), f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
