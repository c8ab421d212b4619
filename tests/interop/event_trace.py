"""Migration event traces, checked by the same rules on QEMU and on vmigrate.

Every test applies a checker to whichever side is QEMU as well as to the
side that is vmigrate, so a rule that real QEMU 7.2 breaks fails the test
instead of silently encoding a wrong expectation.
"""

from __future__ import annotations

import time

from vmigrate.harness.launcher import VMProcess

WATCHED = ("MIGRATION", "MIGRATION_PASS", "STOP", "RESUME")


def compact(event: dict) -> str:
    """``setup``/``active``/... for MIGRATION, ``pass:N``, or the event name."""
    name = event["event"]
    if name == "MIGRATION":
        return event["data"]["status"]
    if name == "MIGRATION_PASS":
        return f"pass:{event['data']['pass']}"
    return name


def collect(vm: VMProcess, until: str, timeout: float = 10.0) -> list[str]:
    """The compacted watched events received so far, waiting (bounded) until *until* arrived.

    A state seen through ``query-migrate`` may precede its event on the wire,
    so tests wait for the event itself.
    """
    trace: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        trace += [compact(e) for e in vm.events() if e["event"] in WATCHED]
        if until in trace:
            return trace
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no {until!r} event within {timeout}s; got {trace}")
        event = vm.qmp.next_event(min(left, 0.2))
        if event is not None and event["event"] in WATCHED:
            trace.append(compact(event))


def check_source(trace: list[str], was_running: bool) -> int:
    """Source side of a completed precopy; returns the number of passes.

    setup, pass 1 (the bitmap sync of the setup phase), active, further
    passes, STOP when the guest was running, the final pass of the
    stop-and-copy phase, completed.
    """
    assert trace[:3] == ["setup", "pass:1", "active"], trace
    assert trace[-1] == "completed", trace
    middle = trace[3:-1]
    passes = [int(t.split(":")[1]) for t in trace if t.startswith("pass:")]
    assert passes == list(range(1, len(passes) + 1)), trace
    assert middle and middle[-1].startswith("pass:"), f"no final bitmap sync after the guest stopped: {trace}"
    stops = [i for i, t in enumerate(middle) if t == "STOP"]
    if was_running:
        assert stops == [len(middle) - 2], trace
    else:
        assert stops == [], trace
    assert "RESUME" not in trace, trace
    return len(passes)


def check_failed_source(trace: list[str], was_running: bool) -> None:
    """A source whose destination went away: no switchover, the guest keeps its run state."""
    assert trace[:3] == ["setup", "pass:1", "active"], trace
    assert trace[-1] == "failed", trace
    assert "completed" not in trace, trace
    if was_running:
        # A failure after the stop resumes the guest: STOP and RESUME come in pairs.
        assert trace.count("STOP") == trace.count("RESUME"), trace


def check_destination(trace: list[str], resumes: bool) -> None:
    """setup (at migrate-incoming), active, RESUME if the guest starts here, completed."""
    assert trace == ["setup", "active", *(["RESUME"] if resumes else []), "completed"], trace


def check_failed_destination(trace: list[str]) -> None:
    assert trace == ["setup", "active", "failed"], trace
