"""Sanity rules for a completed source's ``query-migrate``, applied to QEMU and vmigrate alike."""

from __future__ import annotations

from ramfile import PAGE_SIZE

#: A normal page record: be64 address|flags, then the page (idstrs only add to this).
NORMAL_RECORD = 8 + PAGE_SIZE
#: A zero page record: be64 address|flags, then the fill byte.
ZERO_RECORD = 8 + 1


def check_completed(info: dict, ram_size: int) -> dict:
    assert info["status"] == "completed", info
    ram = info["ram"]
    assert ram["total"] == ram_size
    assert ram["remaining"] == 0
    assert ram["page-size"] == PAGE_SIZE
    assert ram["normal"] + ram["duplicate"] >= ram_size // PAGE_SIZE, "some pages were never sent"
    assert ram["normal-bytes"] == ram["normal"] * PAGE_SIZE
    assert ram["transferred"] >= ram["normal"] * NORMAL_RECORD + ram["duplicate"] * ZERO_RECORD
    assert ram["precopy-bytes"] + ram["downtime-bytes"] == ram["transferred"]
    assert ram["postcopy-bytes"] == 0 and ram["multifd-bytes"] == 0 and ram["skipped"] == 0
    assert ram["dirty-pages-rate"] == 0  # not reported once completed
    assert ram["mbps"] > 0
    assert 0 <= info["setup-time"] <= info["total-time"]
    assert 0 <= info["downtime"] <= info["total-time"]
    assert "expected-downtime" not in info
    return ram
