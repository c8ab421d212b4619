"""What a captured stream (``exec:cat > FILE``) says about the source's statistics.

QEMU 7.2 counts into ``ram.transferred`` the page records and the EOS of
each iteration (PART) section, and nothing else: not the setup section, not
section headers/footers, not the EOS of the END section, not device state
or the VM description.  So from a capture the exact value follows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SECTION_FRAMING = 5 + 5  # type byte + be32 section id, and the 0x7E + be32 footer
EOS = 8


def analyze(path: Path) -> dict:
    """``vmigrate analyze --json`` of a stream file."""
    out = subprocess.run(
        [sys.executable, "-m", "vmigrate", "analyze", "--json", str(path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def ram_accounting(report: dict) -> dict:
    """``normal``, ``duplicate`` and ``transferred`` a source must report for this stream."""
    sections = sorted(report["sections"], key=lambda s: s["offset"])
    transferred = 0
    for section, following in zip(sections, sections[1:]):
        if section["idstr"] != "ram":
            continue
        size = following["offset"] - section["offset"]
        if section["type"] == "PART":
            transferred += size - SECTION_FRAMING
        elif section["type"] == "END":
            transferred += size - SECTION_FRAMING - EOS
    assert sections[-1]["idstr"] != "ram", "a stream ends with device sections, not ram"
    pages = report["ram"]["pages"]
    return {"normal": pages["normal"], "duplicate": pages["zero"], "transferred": transferred}
