"""One migration driven over QMP, recorded: the library side of ``vmigrate migrate``.

:class:`MigrationRun` only uses commands QEMU 7.2 and vmigrate both have,
so it drives either; ``vmigrate migrate`` shows it live, ``vmigrate demo``
and ``vmigrate bench`` reuse it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from vmigrate.migration.forecast import ConvergenceForecast, ForecastSample
from vmigrate.qmp.client import QMPClient

#: The states a migration ends in (QAPI MigrationStatus).
FINAL = frozenset({"completed", "failed", "cancelled"})
#: How long a migration may take to stop after ``migrate_cancel``.
CANCEL_TIMEOUT = 30.0
#: QEMU 7.2's default ``downtime-limit`` in ms (migration/migration.c), for a source that does not report one.
DEFAULT_DOWNTIME_LIMIT = 300


@dataclass
class Sample:
    """One ``query-migrate`` of the source, *t* seconds after ``migrate``."""

    t: float
    status: str
    transferred: int = 0
    remaining: int = 0
    total: int = 0
    mbps: float = 0.0
    dirty_rate: int = 0
    passes: int = 0
    expected_downtime: int | None = None
    throttle: int = 0
    forecast: dict | None = None

    @classmethod
    def from_info(cls, t: float, info: dict) -> "Sample":
        """The sample of one answer; ``forecast`` is vmigrate's own ``x-vmigrate-forecast`` if it has one."""
        ram = info.get("ram", {})
        return cls(
            t=t, status=info.get("status", "none"), transferred=ram.get("transferred", 0),
            remaining=ram.get("remaining", 0), total=ram.get("total", 0), mbps=ram.get("mbps", 0.0),
            dirty_rate=ram.get("dirty-pages-rate", 0) * ram.get("page-size", 4096),
            passes=ram.get("dirty-sync-count", 0), expected_downtime=info.get("expected-downtime"),
            throttle=info.get("cpu-throttle-percentage", 0), forecast=info.get("x-vmigrate-forecast"),
        )

    def forecast_input(self, downtime_limit_ms: int) -> ForecastSample:
        """What :class:`ConvergenceForecast` takes: ``mbps`` is Mbit/s of 10**6 bits (ram.c's rate window)."""
        return ForecastSample(t=self.t, remaining=self.remaining, transferred=self.transferred,
                              dirty_rate=self.dirty_rate, bandwidth=self.mbps * 1e6 / 8,
                              downtime_limit_ms=downtime_limit_ms)


def bound_uri(uri: str, info: dict) -> str:
    """``tcp:HOST:0`` → the port the destination really bound (from its ``socket-address``).

    Lets callers ask for an ephemeral port instead of guessing a free one,
    which would race with other processes on the host.
    """
    if not (uri.startswith("tcp:") and uri.endswith(":0")):
        return uri
    for addr in info.get("socket-address", []):
        if addr.get("type") == "inet":
            host = addr["host"]
            return f"tcp:[{host}]:{addr['port']}" if ":" in host else f"tcp:{host}:{addr['port']}"
    return uri


def wait_migration_event(client: QMPClient, statuses: set[str] | frozenset[str], timeout: float) -> dict | None:
    """The first ``MIGRATION`` event with a status in *statuses* (its timestamp is the emitter's clock)."""
    deadline = time.monotonic() + timeout
    while True:
        for event in client.poll_events(max(0.0, min(0.2, deadline - time.monotonic()))):
            if event.get("event") == "MIGRATION" and event["data"]["status"] in statuses:
                return event
        if time.monotonic() >= deadline:
            return None


def event_time(event: dict | None) -> float | None:
    """An event's timestamp in seconds of the host clock (``time.time()``), None without event."""
    if event is None:
        return None
    ts = event["timestamp"]
    return ts["seconds"] + ts["microseconds"] / 1e6


@dataclass
class MigrationRun:
    """Drives one migration and records what happened."""

    src: QMPClient
    uri: str
    dst: QMPClient | None = None
    samples: list[Sample] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    dest_status: str | None = None
    t0: float = 0.0
    capabilities: dict[str, bool] = field(default_factory=dict)
    parameters: dict = field(default_factory=dict)
    forecaster: ConvergenceForecast = field(default_factory=ConvergenceForecast)
    downtime_limit: int = DEFAULT_DOWNTIME_LIMIT
    postcopy_t: float | None = None

    def prepare(self, caps: list[dict], params: dict) -> None:
        """Capabilities (``events`` always on) and parameters on both sides; the destination listening."""
        caps = [c for c in caps if c["capability"] != "events"] + [{"capability": "events", "state": True}]
        self.capabilities = {c["capability"]: c["state"] for c in caps}
        self.parameters = dict(params)
        for side in filter(None, (self.src, self.dst)):
            side.execute("migrate-set-capabilities", {"capabilities": caps})
            if params:
                side.execute("migrate-set-parameters", params)
        self.downtime_limit = self.src.execute("query-migrate-parameters").get("downtime-limit",
                                                                               DEFAULT_DOWNTIME_LIMIT)
        if self.dst is not None:
            info = self.dst.execute("query-migrate")
            if "socket-address" not in info:
                self.dst.execute("migrate-incoming", {"uri": self.uri})
                info = self.dst.execute("query-migrate")
            self.uri = bound_uri(self.uri, info)

    def describe(self) -> dict:
        """What migrates where and how: the ``run`` record of the JSON log (docs/client-json.md)."""
        def name(side: QMPClient | None) -> str | None:
            return None if side is None else side.execute("query-name").get("name")

        return {
            "source": self.src.address, "source-name": name(self.src),
            "destination": None if self.dst is None else self.dst.address, "destination-name": name(self.dst),
            "uri": self.uri, "capabilities": self.capabilities, "parameters": self.parameters,
        }

    def start(self) -> None:
        self.t0 = time.monotonic()
        self.src.execute("migrate", {"uri": self.uri})

    def sample(self) -> Sample:
        info = self.src.execute("query-migrate")
        s = Sample.from_info(time.monotonic() - self.t0, info)
        forecast = self.forecaster.update(s.forecast_input(self.downtime_limit))
        if s.forecast is None and s.status not in FINAL and s.status != "setup":
            s.forecast = forecast.to_qmp()
        self.samples.append(s)
        if s.status in FINAL:
            self.final = info
        return s

    def wait(self, timeout: float, interval: float, on_sample: Callable[[Sample], None] = lambda s: None,
             steer: Callable[[Sample], bool] = lambda s: False) -> bool:
        """Sample until the source ends, cancelling after *timeout* s; True if it had to be cancelled.

        *on_sample* sees every sample, the final one included; *steer* sees
        each one before the end and returns True to cancel (a stall).
        TimeoutError if the migration does not stop within
        :data:`CANCEL_TIMEOUT` of the cancel.
        """
        deadline = time.monotonic() + timeout
        cancel_deadline = None
        while True:
            s = self.sample()
            on_sample(s)
            if s.status in FINAL:
                return cancel_deadline is not None
            now = time.monotonic()
            if cancel_deadline is None and (now > deadline or steer(s)):
                self.cancel()
                cancel_deadline = now + CANCEL_TIMEOUT
            elif cancel_deadline is not None and now > cancel_deadline:
                raise TimeoutError(f"a migration did not stop within {CANCEL_TIMEOUT:.0f} s of migrate_cancel")
            time.sleep(interval)

    def settle_final(self, timeout: float = 5.0) -> None:
        """Re-read a ``completed`` result until its times are filled in.

        QEMU 7.2 sets the state to ``completed`` before it computes total-time
        and downtime (migration_iteration_finish in migration/migration.c),
        and vmigrate does the same, so a query in between sees both as 0.
        """
        deadline = time.monotonic() + timeout
        while self.final.get("status") == "completed" and not self.final.get("total-time"):
            if time.monotonic() > deadline:
                return
            time.sleep(0.02)
            self.final = self.src.execute("query-migrate")

    def finish(self, timeout: float = 30.0) -> None:
        """After the source ends, wait for the destination to settle."""
        if self.dst is None or self.final.get("status") != "completed":
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.dest_status = self.dst.execute("query-migrate").get("status")
            if self.dest_status in FINAL:
                return
            time.sleep(0.05)

    def cancel(self) -> None:
        self.src.execute("migrate_cancel")

    def start_postcopy(self) -> None:
        """``migrate-start-postcopy``: the source switches at its next iteration (docs/qemu/postcopy.md §2)."""
        self.src.execute("migrate-start-postcopy")
        self.postcopy_t = time.monotonic() - self.t0

    def summary(self) -> dict:
        ram = self.final.get("ram", {})
        return {
            "status": self.final.get("status", self.samples[-1].status if self.samples else "none"),
            "destination-status": self.dest_status,
            "total-time-ms": self.final.get("total-time"),
            "setup-time-ms": self.final.get("setup-time"),
            "downtime-ms": self.final.get("downtime"),
            "transferred-bytes": ram.get("transferred"),
            "ram-total-bytes": ram.get("total"),
            "passes": ram.get("dirty-sync-count"),
            "zero-pages": ram.get("duplicate"),
            "normal-pages": ram.get("normal"),
            "mbps": ram.get("mbps"),
            "error-desc": self.final.get("error-desc"),
            "postcopy-start-s": None if self.postcopy_t is None else round(self.postcopy_t, 3),
        }
