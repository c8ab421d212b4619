"""vmigrate: QEMU 7.2's live migration, re-implemented in Python."""

__version__ = "0.1.0"

#: The QMP API level vmigrate implements: the one of QEMU 7.2.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
