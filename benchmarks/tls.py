#!/usr/bin/env python3
"""TLS throughput: vmigrate -> vmigrate against QEMU 7.2 -> QEMU 7.2 in the same run.

An idle guest of ``--size`` random RAM (default 1 GiB; the RAM files on
/dev/shm) migrates over tcp loopback at unlimited bandwidth in three cases,
each for both implementations, in alternating order per repetition (see
"Fresh host memory" in docs/benchmarks.md):

* ``plain``: no TLS, the baseline;
* ``tls``: ``tls-creds`` on both sides, x509 credentials (``verify-peer=on``);
* ``multifd2-tls``: the same with ``multifd`` and 2 channels.

Each run's figures are ``query-migrate``'s total-time and the wall time to
the destination's ``completed`` event; the destination's RAM is compared
with the source's.  The credentials are made fresh by tests/tls_certs.py (a
CA, a server certificate naming 127.0.0.1).  Results: ``tls.json`` (every
run, the medians, the vmigrate/QEMU ratios) and ``tls.csv`` under ``--out``.

Usage: ``.venv/bin/python benchmarks/tls.py [--size 1G] [--repeat 1] [--out benchmarks/results/tls]``
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's vmigrate and its test PKI

from tls_certs import make_pki  # noqa: E402
from vmigrate.cli.bench.images import fill_ram_image  # noqa: E402
from vmigrate.cli.bench.report import median_of, ratio, write_outputs  # noqa: E402
from vmigrate.cli.bench.runner import IMPLS, UNLIMITED_BANDWIDTH, RunSpec, migrate_once  # noqa: E402
from vmigrate.cli.bench.script import prepare, script_parser  # noqa: E402

log = logging.getLogger("benchmarks.tls")

#: case -> (capabilities, parameters beyond tls-creds, whether TLS is on)
CASES: dict[str, tuple[tuple[str, ...], dict, bool]] = {
    "plain": ((), {}, False),
    "tls": ((), {}, True),
    "multifd2-tls": (("multifd",), {"multifd-channels": 2}, True),
}


def tls_args(impl: str, pki: Path) -> dict[str, tuple[str, ...]]:
    """The credentials object per role, in each implementation's option spelling."""
    option = "--object" if impl == "vmigrate" else "-object"
    return {role: (option, f"tls-creds-x509,id=tls0,dir={pki / endpoint},endpoint={endpoint},verify-peer=on")
            for role, endpoint in (("src", "client"), ("dst", "server"))}


def run_case(case: str, impl: str, size: int, pki: Path, image: Path, workdir: Path, logdir: Path,
             timeout: float) -> dict:
    caps, params, tls = CASES[case]
    params = params | ({"tls-creds": "tls0"} if tls else {})
    spec = RunSpec(impl, case, size, caps=caps, params=params, timeout=timeout,
                   extra_args=tls_args(impl, pki) if tls else None)
    rec = migrate_once(spec, image, workdir, logdir)
    rec.pop("samples", None)
    if rec.get("wall_s"):
        rec["wall_mib_s"] = round(size / (1 << 20) / rec["wall_s"], 1)
    return rec


def summarize(records: list[dict]) -> dict:
    """Medians of the good runs per case and implementation; vmigrate/QEMU ratios of each."""
    summary: dict = {}
    for case in CASES:
        entry: dict = {}
        for impl in IMPLS:
            good = [r for r in records if r["scenario"] == case and r["impl"] == impl
                    and r["status"] == "completed" and r.get("verified")]
            entry[impl] = {"good": len(good), **{key: median_of(good, key) for key in
                           ("total_time_ms", "wall_s", "guest_mib_s", "wall_mib_s", "transferred_bytes")}}
        v, q = entry["vmigrate"], entry["qemu"]
        entry["ratios"] = {"total_time_vmigrate_over_qemu": ratio(v["total_time_ms"], q["total_time_ms"]),
                           "throughput_vmigrate_over_qemu": ratio(v["guest_mib_s"], q["guest_mib_s"])}
        summary[case] = entry
    for impl in IMPLS:
        plain = summary["plain"][impl]["total_time_ms"]
        summary[f"tls_slowdown_{impl}"] = ratio(summary["tls"][impl]["total_time_ms"], plain)
    return summary


def main() -> int:
    args = script_parser(__doc__, ROOT / "benchmarks" / "results" / "tls").parse_args()
    size, logdir, workdir = prepare(args, "tls")
    records: list[dict] = []
    try:
        pki = workdir / "pki"
        make_pki(pki)
        log.info("filling %d MiB of random guest RAM in %s", size >> 20, workdir)
        image = fill_ram_image(workdir / "src.ram", size, 0.0, args.seed)
        for rep in range(args.repeat):
            for case in CASES:
                for impl in IMPLS if rep % 2 == 0 else IMPLS[::-1]:
                    rec = run_case(case, impl, size, pki, image.path, workdir, logdir, args.timeout) | {"rep": rep}
                    records.append(rec)
                    log.info("run %d %-13s %-8s %s total-time %s ms, wall %s s, %s MiB/s, RAM equal: %s",
                             rep + 1, case, impl, rec["status"], rec.get("total_time_ms"), rec.get("wall_s"),
                             rec.get("guest_mib_s"), rec.get("verified"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize(records)
    config = {"size": size, "repeat": args.repeat, "seed": args.seed, "cases": {
        case: {"caps": list(caps), "params": {"max-bandwidth": UNLIMITED_BANDWIDTH} | params
               | ({"tls-creds": "tls0"} if tls else {})} for case, (caps, params, tls) in CASES.items()}}
    write_outputs(args.out, "tls", config, records, summary)
    for case in CASES:
        log.info("%-13s %s", case, summary[case])
    log.info("written: %s", args.out / "tls.json")
    return 0 if all(r["status"] == "completed" and r.get("verified") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
