"""The JSON records' documented fields, read from docs/client-json.md: the doc is the contract.

Tests check records that ``vmigrate migrate`` really wrote against it, so
the doc cannot drift from the output without a test failing.
"""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).parents[1] / "docs" / "client-json.md"
TYPES = {"string": str, "integer": int, "number": (int, float), "object": dict, "boolean": bool}
HEADING = re.compile(r"^## `(\w+)` record$")
ROW = re.compile(r"^\| `([\w-]+)` \| ([a-z ]+) \|")


def documented_fields() -> dict[str, dict[str, str]]:
    """Record type → field → documented type, from the table under each ``## `TYPE` record``.

    Any other heading ends a record's table (``### The forecast`` documents a field's members).
    """
    fields: dict[str, dict[str, str]] = {}
    current = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            match = HEADING.match(line)
            current = match.group(1) if match else None
            if current:
                fields[current] = {}
        elif current and (row := ROW.match(line)):
            fields[current][row.group(1)] = row.group(2).strip()
    return fields


def type_ok(value, documented: str) -> bool:
    base, _, null = documented.partition(" or ")
    if value is None:
        return null == "null"
    return isinstance(value, TYPES[base]) and not (base in ("integer", "number") and isinstance(value, bool))


def record_problems(records: list[dict]) -> list[str]:
    """Everything in *records* that the doc does not say: order, unknown or missing fields, types."""
    schema = documented_fields()
    kinds = [next(iter(r)) for r in records]
    problems = []
    middle = kinds[1:-1]
    if (not kinds or kinds[0] != "run" or kinds[-1] != "summary" or "sample" not in middle
            or not set(middle) <= {"sample", "postcopy", "stall"}
            or any(middle.count(k) > 1 for k in ("postcopy", "stall"))):
        problems.append(f"record order is not run, sample... (postcopy, stall at most once), summary: {kinds}")
    for number, record in enumerate(records, 1):
        if len(record) != 1:
            problems.append(f"record {number} has keys {sorted(record)}, not one")
            continue
        (kind, body), = record.items()
        documented = schema.get(kind)
        if documented is None:
            problems.append(f"record {number}: undocumented type '{kind}'")
            continue
        if set(body) != set(documented):
            problems.append(f"record {number} ({kind}): fields {sorted(set(body) ^ set(documented))} "
                            "are in the output or the doc but not both")
        for name, value in body.items():
            if name in documented and not type_ok(value, documented[name]):
                problems.append(f"record {number} ({kind}): {name}={value!r} is not {documented[name]}")
    return problems
