"""Errors of the migration engine, by layer (``docs/architecture.md``, "Errors by layer")."""

from __future__ import annotations

from vmigrate.errors import VMError


class MigrationError(VMError):
    """A migration request refused with QEMU's class and text (``migrate``, options, URIs)."""

