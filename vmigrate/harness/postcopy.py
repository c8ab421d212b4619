"""When a client switches a migration to postcopy, or gives it up: ``--postcopy`` and ``--stall``.

Postcopy (docs/qemu/postcopy.md) finishes any migration in bounded time:
the guest runs on the destination and pulls what is missing.  The client
decides from the forecast (:mod:`vmigrate.migration.forecast`, as the
``forecast`` of each sample in docs/client-json.md) and issues
``migrate-start-postcopy``; the ``postcopy-ram`` capability must have been
set on both sides before ``migrate``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Source statuses once the switch has happened (QAPI MigrationStatus, docs/qemu/postcopy.md §8).
POSTCOPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})


@dataclass(frozen=True)
class PostcopyPlan:
    """``auto`` with a precopy budget (*max_precopy* s), or a switch *after* a fixed time."""

    after: float | None = None
    max_precopy: float | None = None

    @classmethod
    def parse(cls, text: str, max_precopy: float | None) -> "PostcopyPlan":
        """``auto`` (needs *max_precopy*) or ``after=SECONDS``; ValueError with what is wrong."""
        if text == "auto":
            if max_precopy is None:
                raise ValueError("--postcopy auto needs --max-precopy SECONDS")
            return cls(max_precopy=max_precopy)
        name, sep, value = text.partition("=")
        if name != "after" or not sep:
            raise ValueError(f"--postcopy must be auto or after=SECONDS: '{text}'")
        try:
            return cls(after=float(value))
        except ValueError:
            raise ValueError(f"invalid seconds in --postcopy '{text}'") from None

    @property
    def auto(self) -> bool:
        return self.max_precopy is not None

    def reason(self, t: float, forecast: dict | None) -> str | None:
        """Why to switch now, *t* s after ``migrate`` with that forecast (its ``to_qmp`` form), None to wait.

        ``auto`` waits for a measured bandwidth: before the first rate window
        (``mbps`` 0) nothing is known yet.
        """
        if self.after is not None:
            return f"{self.after:g} s after the start" if t >= self.after else None
        if forecast is None:
            return None
        if forecast.get("stalled"):
            return "no progress"
        if not forecast.get("bandwidth"):
            return None
        if not forecast["converges"]:
            return "precopy will not converge"
        if t + forecast["seconds"] > self.max_precopy:
            return f"precopy would need ~{forecast['seconds']:.0f} s more, past --max-precopy {self.max_precopy:g} s"
        return None
