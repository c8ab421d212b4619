"""Derive vmigrate/qapi/migration.json from QEMU's QAPI schema text.

The seed is QAPI's dialect of JSON (single-quoted strings, ``#`` comments
holding the documentation); the package ships only the definitions, as plain
JSON, so nothing of QEMU's documentation is copied.  ``include`` directives
are dropped: ``vmigrate/qapi/core.json`` provides what the seed includes and
itself includes migration.json.  Run: ``python tools/gen_schema.py SEED OUT``.
"""

from __future__ import annotations

import json
import sys


def to_json_text(text: str) -> str:
    """Drop comments and turn QAPI's quoting into JSON's.

    QAPI strings are single-quoted and contain neither quotes nor escapes,
    so a character scan that tracks "inside a string" is exact.
    """
    out = []
    in_string = False
    in_comment = False
    for ch in text:
        if in_comment:
            if ch == "\n":
                in_comment = False
                out.append(ch)
        elif ch == "'":
            in_string = not in_string
            out.append('"')
        elif ch == "#" and not in_string:
            in_comment = True
        else:
            out.append(ch)
    return "".join(out)


def definitions(text: str) -> list[dict]:
    """The top-level expressions of a QAPI file, includes removed."""
    body = to_json_text(text)
    decoder = json.JSONDecoder()
    exprs = []
    pos = 0
    while True:
        while pos < len(body) and body[pos].isspace():
            pos += 1
        if pos == len(body):
            break
        expr, pos = decoder.raw_decode(body, pos)
        exprs.append(expr)
    return [e for e in exprs if "include" not in e]


def main(argv: list[str]) -> int:
    seed, out = argv[1], argv[2]
    with open(seed, encoding="utf-8") as f:
        defs = definitions(f.read())
    with open(out, "w", encoding="utf-8") as f:
        json.dump(defs, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
