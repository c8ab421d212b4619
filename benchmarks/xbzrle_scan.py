#!/usr/bin/env python3
"""Per-core throughput of the page codecs: XBZRLE encode/decode and the zero-page scan.

Single-threaded, on batches of 1024 pages (what the migration thread hands
them), in GB/s of *page data examined* (4096 bytes per page, whatever the
encoding comes to), median of several repetitions.  Page change patterns:

* ``unchanged``: the page equals the cached copy (nothing is sent);
* ``8 bytes``: one 64-bit word rewritten (what the ``stress`` guest does);
* ``20% run``: 819 contiguous bytes rewritten at a random offset;
* ``20% spread``: 819 bytes rewritten as 13 runs of 63 bytes;
* ``5% bytes``: 5 % of the bytes flipped at random positions (many short runs);
* ``all``: every byte changed (every page overflows: no output).

Zero scan: all-zero pages (the whole page is read), random pages (the first
64 bytes decide), and pages whose only non-zero byte is the last one.

Usage: ``python benchmarks/xbzrle_scan.py [--pages 1024] [--repeat 7] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from vmigrate.migration.wire import ram as wire_ram
from vmigrate.migration.wire import xbzrle as wire_xbzrle

PAGE = 4096


def timed(fn, repeat: int) -> float:
    """Median seconds of ``fn()`` over ``repeat`` runs (after one warm-up)."""
    fn()
    samples = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def changed_pages(old: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    new = old.copy()
    n = len(old)
    if kind == "8 bytes":
        new[:, 512:520] ^= 0x5A
    elif kind == "20% run":
        starts = rng.integers(0, PAGE - 819, n)
        cols = starts[:, None] + np.arange(819)
        new[np.arange(n)[:, None], cols] ^= 0x5A
    elif kind == "20% spread":
        cols = (np.arange(13)[:, None] * 315 + np.arange(63)).ravel()
        new[:, cols] ^= 0x5A
    elif kind == "5% bytes":
        new[rng.random(new.shape) < 0.05] ^= 0x5A
    elif kind == "all":
        new ^= 0x5A
    return new


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    old = rng.integers(0, 256, size=(args.pages, PAGE), dtype=np.uint8)
    volume = args.pages * PAGE
    results: dict[str, dict] = {"xbzrle": {}, "zero_scan": {}}

    print(f"XBZRLE, {args.pages} pages per batch, GB/s of page data per core")
    print(f"{'pattern':12} {'encode':>8} {'decode':>8} {'encoded/page':>13} {'overflow':>9}")
    for kind in ("unchanged", "8 bytes", "20% run", "20% spread", "5% bytes", "all"):
        new = changed_pages(old, kind, rng)
        enc = wire_xbzrle.encode_batch(old, new, gap=11)
        t_enc = timed(lambda: wire_xbzrle.encode_batch(old, new, gap=11), args.repeat)
        sent = np.flatnonzero(enc.lengths > 0)
        row = {"encode_gb_s": volume / t_enc / 1e9, "overflow_pages": int((enc.lengths < 0).sum()),
               "mean_encoded_bytes": float(enc.lengths[sent].mean()) if sent.size else 0.0}
        if sent.size:
            dst = old.copy()
            flat = dst.reshape(-1)
            t_dec = timed(lambda: wire_xbzrle.decode_into(flat, sent * PAGE, enc.out, enc.starts[sent],
                                                          enc.lengths[sent]), args.repeat)
            assert np.array_equal(dst[sent], new[sent])
            row["decode_gb_s"] = len(sent) * PAGE / t_dec / 1e9
        results["xbzrle"][kind] = row
        dec = f"{row['decode_gb_s']:8.2f}" if "decode_gb_s" in row else f"{'-':>8}"
        print(f"{kind:12} {row['encode_gb_s']:8.2f} {dec} {row['mean_encoded_bytes']:13.0f} "
              f"{row['overflow_pages']:9d}")

    print("\nzero-page scan (nonzero_pages), GB/s of page data per core")
    idx = np.arange(args.pages)
    tail = np.zeros_like(old)
    tail[:, -1] = 1
    for name, pages in (("all zero", np.zeros_like(old)), ("random", old), ("last byte set", tail)):
        t = timed(lambda: wire_ram.nonzero_pages(pages, idx), args.repeat)
        results["zero_scan"][name] = {"gb_s": volume / t / 1e9}
        print(f"{name:14} {volume / t / 1e9:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
