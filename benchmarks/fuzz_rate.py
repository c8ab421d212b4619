"""Fuzz throughput per decoder, without the fuzz tests' instrumentation (docs/fuzzing.md).

tests/fuzz measures every input's allocation with ``tracemalloc`` and draws it through
hypothesis, which together cost most of each input's time.  This replays inputs mutated the
same way (bit flips, cuts, insertions, deletions, splices of the captured corpus, or random
bytes), generated up front, and times only the decoders: the rate a coverage-free fuzzer or a
hostile peer gets out of them.  Run: ``python benchmarks/fuzz_rate.py [--inputs N] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "fuzz"))

from fuzz_targets import TARGETS, corpus, mutate  # noqa: E402

log = logging.getLogger("fuzz-rate")


def measure(name: str, inputs: int, seed: int) -> dict:
    target = TARGETS[name]
    rng = random.Random(seed)
    seeds = corpus(name)
    cases = [mutate(rng, seeds) for _ in range(inputs)]
    rejected = 0
    slowest = 0.0
    start = time.perf_counter()
    for payload, split in cases:
        began = time.perf_counter()
        try:
            target.run(payload, split)
        except target.error if target.error else ():
            rejected += 1
        slowest = max(slowest, time.perf_counter() - began)
    elapsed = time.perf_counter() - start
    return {"target": name, "inputs": inputs, "seconds": round(elapsed, 3),
            "inputs_per_second": round(inputs / elapsed), "rejected": rejected,
            "slowest_ms": round(slowest * 1000, 2), "mean_input_bytes": sum(len(p) for p, _ in cases) // inputs}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=3000, help="inputs per decoder")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = [measure(name, args.inputs, args.seed) for name in sorted(TARGETS)]
    for r in rows:
        log.info("%-12s %7d inputs/s  (%d inputs, %d rejected, slowest %.1f ms, mean %d bytes)", r["target"],
                 r["inputs_per_second"], r["inputs"], r["rejected"], r["slowest_ms"], r["mean_input_bytes"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"inputs_per_target": args.inputs, "seed": args.seed, "rows": rows},
                                        indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
