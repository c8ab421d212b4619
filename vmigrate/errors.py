"""The error every layer below the command handlers raises for a refused request.

Engines (migration, the vCPU services) know QEMU's error texts and classes
but nothing of QMP: they raise :class:`VMError`, and the command layer
(:mod:`vmigrate.commands`) answers it as a QMP error.  Wire codecs raise
their own :class:`~vmigrate.migration.wire.errors.WireError` instead.
"""

from __future__ import annotations


class VMError(Exception):
    """A request refused with QEMU's error class (``GenericError`` mostly) and description."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
