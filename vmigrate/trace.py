"""Placeholder: replaced by the trace module of the docs branch."""

from __future__ import annotations

import logging

_log = logging.getLogger("vmigrate.trace")


def trace(name: str, **fields: object) -> None:
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("%s %s", name, " ".join(f"{k}={v}" for k, v in fields.items()))
