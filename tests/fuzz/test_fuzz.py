"""Property-based fuzzing of every sans-IO decoder and the QMP parser (hypothesis).

Inputs are the captured corpus, mutated (bytes flipped, cut, inserted,
deleted, spliced), or plain random bytes.  Invariants, for every input:
only the decoder's own error type escapes; the allocation it causes stays
under MEMORY_LIMIT; it finishes within the hypothesis deadline.  CI runs a
short budget; ``VMIGRATE_FUZZ_EXAMPLES=N`` sets a longer one (docs/fuzzing.md).
"""

from __future__ import annotations

import os
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_targets import TARGETS, corpus, mutate

EXAMPLES = int(os.environ.get("VMIGRATE_FUZZ_EXAMPLES", "150"))
#: What one input (at most a few hundred KiB) may make a decoder allocate.
MEMORY_LIMIT = 64 << 20


@st.composite
def mutated(draw, seeds: list[bytes]) -> tuple[bytes, int]:
    """fuzz_targets.mutate, its choices drawn by hypothesis (so a failure replays)."""
    return mutate(draw(st.randoms(use_true_random=False)), seeds)


@pytest.fixture(scope="module", autouse=True)
def traced_memory():
    tracemalloc.start()
    yield
    tracemalloc.stop()


@pytest.mark.parametrize("name", sorted(TARGETS))
@settings(max_examples=EXAMPLES, deadline=2000, derandomize=not os.environ.get("VMIGRATE_FUZZ_EXAMPLES"),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data())
def test_decoder_survives_hostile_input(name, data):
    target = TARGETS[name]
    payload, split = data.draw(mutated(corpus(name)))
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    try:
        target.run(payload, split)
    except target.error if target.error else ():
        pass
    peak = tracemalloc.get_traced_memory()[1] - before
    assert peak < MEMORY_LIMIT, f"{name}: {peak} bytes allocated for a {len(payload)}-byte input"
