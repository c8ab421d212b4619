"""Trace points and the set-up of vmigrate's logging.

QEMU marks the interesting moments of a migration with named trace points, listed in its
``migration/trace-events`` (``migrate_set_state``, ``qemu_savevm_send_packaged``,
``ram_save_iterate_big_wait`` ...), all off until ``-trace PATTERN`` switches on those whose
names match (``-trace 'migration_*'``; QEMU's ``docs/devel/tracing.rst``). vmigrate keeps the
names and the switch: a point is a call ``trace("migrate_set_state", new_state="active")`` at
the place where QEMU 7.2 has the point of that name, and ``vmigrate run --trace PATTERN``
switches points on. An enabled point becomes a DEBUG record of the logger ``vmigrate.trace``
reading ``migrate_set_state new_state=active``, the shape of QEMU's ``log`` trace backend.

Points sit on hot paths (per page batch, per section), so a disabled one costs a truth test
while nothing is enabled and one dict lookup once something is; fields are only formatted for
an enabled point. Code that must compute a field first guards it with :func:`enabled`.

Everything else goes through :mod:`logging` too (``logging.getLogger(__name__)``): library
code never writes to stderr itself, and :func:`setup_logging` installs the one handler that
does, as a command's first step.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from fnmatch import fnmatchcase

TRACE_LOGGER = "vmigrate.trace"

_logger = logging.getLogger(TRACE_LOGGER)
# The points themselves decide what is traced: their records pass whatever level the
# ``vmigrate`` logger has, which governs ordinary messages (warnings by default).
_logger.setLevel(logging.DEBUG)

_patterns: list[str] = []
_decided: dict[str, bool] = {}
_handler: logging.Handler | None = None


def enable(pattern: str) -> None:
    """Switch on the points matching *pattern*: fnmatch globs, comma-separated (``migrate_*,ram_*``).

    Repeated calls add up, like repeated ``-trace`` options of QEMU.
    """
    _patterns.extend(p for p in (part.strip() for part in pattern.split(",")) if p)
    _decided.clear()


def reset() -> None:
    """Switch every point off again."""
    _patterns.clear()
    _decided.clear()


def enabled(name: str) -> bool:
    """Whether the point *name* is on; the answer is remembered until the patterns change."""
    on = _decided.get(name)
    if on is None:
        on = _decided[name] = any(fnmatchcase(name, p) for p in _patterns)
    return on


def trace(name: str, **fields: object) -> None:
    """Trace point *name* (a QEMU trace event's name) with its *fields*, if it is enabled."""
    if _patterns and enabled(name):
        _logger.debug("%s", " ".join([name, *(f"{key}={_value(value)}" for key, value in fields.items())]))


def _value(value: object) -> str:
    """A field as one token: text that is empty or has blanks is quoted."""
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


class _Formatter(logging.Formatter):
    """QEMU's shapes on stderr: ``vmigrate: warning: ...`` (``warn_report``), ``vmigrate: ...``
    (``error_report``), and bare trace lines, as QEMU's ``log`` trace backend prints them."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name == TRACE_LOGGER:
            return text
        if record.levelno >= logging.ERROR:
            return f"vmigrate: {text}"
        return f"vmigrate: {record.levelname.lower()}: {text}"


def setup_logging(verbosity: int = 0, patterns: Iterable[str] = ()) -> None:
    """Send the ``vmigrate`` loggers to stderr and enable the trace *patterns*.

    *verbosity* 0 shows warnings and errors, 1 adds info, 2 debug. Calling it again
    replaces the earlier set-up rather than adding a second handler.
    """
    global _handler
    root = logging.getLogger("vmigrate")
    if _handler is not None:
        root.removeHandler(_handler)
    _handler = logging.StreamHandler(sys.stderr)
    _handler.setFormatter(_Formatter())
    root.addHandler(_handler)
    root.setLevel(logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG)
    reset()
    for pattern in patterns:
        enable(pattern)
