"""Derive vmigrate/qapi/qom.json (``object-add``, ``object-del`` and their types) from QEMU 7.2.

QEMU's ``ObjectOptions`` reaches into a dozen of its schema files (qom,
crypto, block-core, net, machine...), which the seed does not include.  The
running QEMU describes the same types through ``query-qmp-schema``; this
turns that introspection back into definitions (structure only: names are
invented, documentation is not copied), so vmigrate's introspection of the
two commands equals QEMU's.  Run: ``python tools/gen_qom_schema.py OUT``
with ``qemu-system-x86_64`` 7.2 on the PATH.
"""

from __future__ import annotations

import json
import subprocess
import sys

COMMANDS = ("object-add", "object-del")


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


def definitions(schema: list[dict]) -> list[dict]:
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

    for command in COMMANDS:
        entry = by_name[command]
        arg = by_name[entry["arg-type"]]
        expr: dict = {"command": command}
        if "tag" in arg:
            expr.update({"data": ref(entry["arg-type"], "ObjectOptions"), "boxed": True})
        else:
            expr["data"] = dict(member(m, command) for m in arg["members"])
        expr["allow-preconfig"] = True
        out.append(expr)
    return out


def main(argv: list[str]) -> int:
    with open(argv[1], "w") as f:
        json.dump(definitions(introspect()), f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
