"""Migration capabilities and parameters of one VM process, with QEMU 7.2's rules.

QEMU keeps one ``MigrationState`` per process whose capability array and
parameter struct are what ``migrate-set-capabilities`` /
``migrate-set-parameters`` edit and every other part of migration reads.
:class:`MigrationOptions` is that pair.  Names and their order come from the
shipped QAPI schema (``MigrationCapability``, ``MigrationParameters``,
``MigrateSetParameters``), so nothing here can drift from what
``query-qmp-schema`` announces; the defaults and the validation rules are
behaviour and live here as data keyed by the QMP (dashed) names.

What callers can rely on (see docs/qemu/params.md):

* Capabilities: refused while a migration is running; the request is applied
  to a copy (last entry wins), the copy is validated with QEMU's rules in
  QEMU's order, and only a valid result is committed.
* Parameters: the request is overlaid on a copy of *all* current values and
  every rule runs on that copy, so a message may name a field the caller did
  not send (e.g. ``max_cpu_throttle`` when only ``cpu-throttle-initial`` was
  raised); one bad member means nothing changes.  Messages use the C field
  names (underscores), as QEMU's do.
* The zero-copy rule consults the *current* ``zero-copy-send`` capability on
  every parameter change, and the current parameters on every capability
  change, so it keeps firing on later, unrelated commands.
* ``tls-authz`` has a third state, *unset*, that queries show as ``""`` but
  that a TLS server must treat differently (no authorization check at all),
  hence :attr:`MigrationOptions.tls_authz_unset`.

Deliberate differences from QEMU 7.2, decided for this project:

* ``multifd-zlib-level`` (0..9) and ``multifd-zstd-level`` (0..20) are
  validated and stored by ``migrate-set-parameters``; QEMU 7.2 accepted and
  silently dropped them (fixed in later QEMU).  Their rules sit where QEMU's
  startup-only rules for them sit, between ``multifd_channels`` and
  ``xbzrle_cache_size``.
* ``tls-authz: null`` is stored as ``""`` (the 7.2.x stable behaviour; 7.2.0
  aborted on an assertion).

Rules of QEMU 7.2 that cannot fire here and are therefore absent:
``max_bandwidth > SIZE_MAX`` (the value is a u64 on a 64-bit host), and the
"compiled without block migration / replication" capability rules (the
mirrored build, Debian's x86_64 QEMU, has both).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Callable

from vmigrate.migration.config import Capabilities, MigrationConfig, Parameters
from vmigrate.qapi import schema
from vmigrate.migration.errors import MigrationError

TARGET_PAGE_SIZE = 4096

#: Value of each parameter in a fresh QEMU 7.2 process.  ``tls-authz`` starts
#: *unset* (None) and ``block-bitmap-mapping`` starts absent (None).
PARAMETER_DEFAULTS: dict[str, Any] = {
    "announce-initial": 50,
    "announce-max": 550,
    "announce-rounds": 5,
    "announce-step": 100,
    "compress-level": 1,
    "compress-threads": 8,
    "compress-wait-thread": True,
    "decompress-threads": 2,
    "throttle-trigger-threshold": 50,
    "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10,
    "cpu-throttle-tailslow": False,
    "tls-creds": "",
    "tls-hostname": "",
    "tls-authz": None,
    "max-bandwidth": 128 << 20,
    "downtime-limit": 300,
    "x-checkpoint-delay": 20000,
    "block-incremental": False,
    "multifd-channels": 2,
    "xbzrle-cache-size": 64 << 20,
    "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99,
    "multifd-compression": "none",
    "multifd-zlib-level": 1,
    "multifd-zstd-level": 1,
    "block-bitmap-mapping": None,
}

#: Parameters whose StrOrNull ``null`` means the empty string.
_NULL_MEANS_EMPTY = ("tls-creds", "tls-hostname", "tls-authz")

#: Capabilities that background-snapshot refuses, in the order QEMU reports
#: the first one that is on.
BACKGROUND_SNAPSHOT_INCOMPATIBLE = (
    "postcopy-ram",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "late-block-activate",
    "return-path",
    "multifd",
    "pause-before-switchover",
    "auto-converge",
    "release-ram",
    "rdma-pin-all",
    "compress",
    "xbzrle",
    "x-colo",
    "validate-uuid",
    "zero-copy-send",
)

MIGRATION_ACTIVE = "There's a migration process in progress"
ZERO_COPY_UNAVAILABLE = "Zero copy only available for non-compressed non-TLS multifd migration"
ZERO_COPY_NOT_LINUX = "Zero copy currently only available on Linux"

_NODE_NAME_MAX = 31
_ALIAS_MAX = 255
_BITMAP_NAME_MAX = 1023


@dataclass(frozen=True)
class _ParamRule:
    """One range check of ``migrate_params_check``: the field it blames and when."""

    field: str
    invalid: Callable[[dict[str, Any]], bool]
    expects: str

    def message(self) -> str:
        return f"Parameter '{self.field.replace('-', '_')}' expects {self.expects}"


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


#: QEMU 7.2's parameter range rules in check order (§2.3 rules 1-17).
_PARAM_RULES = (
    _ParamRule("compress-level", lambda p: p["compress-level"] > 9, "a value between 0 and 9"),
    _ParamRule("compress-threads", lambda p: p["compress-threads"] < 1, "a value between 1 and 255"),
    _ParamRule("decompress-threads", lambda p: p["decompress-threads"] < 1, "a value between 1 and 255"),
    _ParamRule("throttle-trigger-threshold",
               lambda p: not 1 <= p["throttle-trigger-threshold"] <= 100,
               "an integer in the range of 1 to 100"),
    _ParamRule("cpu-throttle-initial", lambda p: not 1 <= p["cpu-throttle-initial"] <= 99,
               "an integer in the range of 1 to 99"),
    _ParamRule("cpu-throttle-increment", lambda p: not 1 <= p["cpu-throttle-increment"] <= 99,
               "an integer in the range of 1 to 99"),
    _ParamRule("downtime-limit", lambda p: p["downtime-limit"] > 2000 * 1000,
               "an integer in the range of 0 to (2000 * 1000) ms"),
    _ParamRule("multifd-channels", lambda p: p["multifd-channels"] < 1, "a value between 1 and 255"),
    _ParamRule("multifd-zlib-level", lambda p: p["multifd-zlib-level"] > 9, "a value between 0 and 9"),
    _ParamRule("multifd-zstd-level", lambda p: p["multifd-zstd-level"] > 20, "a value between 0 and 20"),
    _ParamRule("xbzrle-cache-size",
               lambda p: p["xbzrle-cache-size"] < TARGET_PAGE_SIZE
               or not _is_power_of_two(p["xbzrle-cache-size"]),
               "a power of two no less than the target page size"),
    _ParamRule("max-cpu-throttle",
               lambda p: not p["cpu-throttle-initial"] <= p["max-cpu-throttle"] <= 99,
               "an integer in the range of cpu_throttle_initial to 99"),
    _ParamRule("announce-initial", lambda p: p["announce-initial"] > 100000, "a value between 0 and 100000"),
    _ParamRule("announce-max", lambda p: p["announce-max"] > 100000, "a value between 0 and 100000"),
    _ParamRule("announce-rounds", lambda p: p["announce-rounds"] > 1000, "a value between 0 and 1000"),
    _ParamRule("announce-step", lambda p: not 1 <= p["announce-step"] <= 10000,
               "a value between 0 and 10000"),
)


@dataclass(frozen=True)
class _Names:
    """The schema-derived names this module works with, in schema order."""

    capabilities: tuple[str, ...]
    parameters: tuple[str, ...]
    settable: tuple[str, ...]


@functools.cache
def _names() -> _Names:
    s = schema.load()
    return _Names(
        capabilities=tuple(s.enum_values("MigrationCapability")),
        parameters=tuple(m.name for m in s.members("MigrationParameters")),
        settable=tuple(m.name for m in s.members("MigrateSetParameters")),
    )


def _byte_len(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def _id_wellformed(s: str) -> bool:
    """QEMU's id rule: an ASCII letter, then ASCII letters, digits, ``-``, ``.``, ``_``."""
    return bool(s) and s[0].isascii() and s[0].isalpha() and all(
        c.isascii() and (c.isalnum() or c in "-._") for c in s[1:]
    )


def _bitmap_mapping_error(mapping: list[dict], name_to_alias: bool) -> str | None:
    """First problem building one direction of the dirty-bitmap alias map, if any.

    QEMU builds the outgoing (name→alias) and the incoming (alias→name) map and
    a mapping is valid only if both can be built; duplicates are detected on
    the key side of each direction, hence the two passes.
    """
    nodes: set[str] = set()
    for node in mapping:
        node_name, node_alias = node["node-name"], node["alias"]
        if not _id_wellformed(node_alias):
            return f"The node alias '{node_alias}' is not well-formed"
        if _byte_len(node_alias) > _ALIAS_MAX:
            return f"The node alias '{node_alias}' is longer than {_ALIAS_MAX} bytes"
        if _byte_len(node_name) > _NODE_NAME_MAX:
            return f"The node name '{node_name}' is longer than {_NODE_NAME_MAX} bytes"
        node_key = node_name if name_to_alias else node_alias
        if node_key in nodes:
            return (f"The node name '{node_name}' is mapped twice" if name_to_alias
                    else f"The node alias '{node_alias}' is used twice")
        nodes.add(node_key)
        bitmaps: set[str] = set()
        for bitmap in node["bitmaps"]:
            name, alias = bitmap["name"], bitmap["alias"]
            if _byte_len(alias) > _ALIAS_MAX:
                return f"The bitmap alias '{alias}' is longer than {_ALIAS_MAX} bytes"
            if _byte_len(name) > _BITMAP_NAME_MAX:
                return f"The bitmap name '{name}' is longer than {_BITMAP_NAME_MAX} bytes"
            key = name if name_to_alias else alias
            if key in bitmaps:
                return (f"The bitmap '{node_name}'/'{name}' is mapped twice" if name_to_alias
                        else f"The bitmap alias '{node_alias}'/'{alias}' is used twice")
            bitmaps.add(key)
    return None


def check_bitmap_mapping(mapping: list[dict]) -> None:
    """Raise QEMU's error if ``block-bitmap-mapping`` cannot be used in both directions."""
    for name_to_alias in (True, False):
        detail = _bitmap_mapping_error(mapping, name_to_alias)
        if detail is not None:
            raise MigrationError(f"Invalid mapping given for block-bitmap-mapping: {detail}")


class MigrationOptions:
    """Capabilities + parameters of one VM process (QEMU's MigrationState caps/params).

    ``linux`` and ``zstd`` describe the build being mirrored: without Linux,
    zero-copy-send is refused outright (so the parameter-side zero-copy rule
    can never fire); without zstd, ``multifd-compression`` has no ``zstd``
    value.
    """

    def __init__(self, *, linux: bool = True, zstd: bool = True) -> None:
        names = _names()
        self._linux = linux
        self._zstd = zstd
        self._caps = dict.fromkeys(names.capabilities, False)
        self._params = {name: copy.deepcopy(PARAMETER_DEFAULTS[name]) for name in names.parameters}

    # -- capabilities ------------------------------------------------------

    def query_capabilities(self) -> list[dict]:
        return [{"capability": name, "state": state} for name, state in self._caps.items()]

    def cap(self, name: str) -> bool:
        return self._caps[name]

    def set_capabilities(
        self,
        caps: list[dict],
        *,
        migration_running: bool,
        runstate: str,
        incoming_single_channel: bool,
        postcopy_supported: Callable[[], bool],
        uffd_wp_supported: Callable[[], bool],
        ram_wp_compatible: Callable[[], bool],
    ) -> None:
        """Apply ``migrate-set-capabilities`` atomically.

        The host probes are callables because QEMU only runs them when the
        rule that needs them is reached: the postcopy probe is expensive and
        runs only on a destination (runstate ``inmigrate``) turning
        postcopy-ram on; the write-protect probes only for background-snapshot.
        ``incoming_single_channel`` is true once ``migrate-incoming`` (or
        ``-incoming``) used a transport that cannot carry multifd channels.
        """
        if migration_running:
            raise MigrationError(MIGRATION_ACTIVE)
        new = dict(self._caps)
        for entry in caps:
            new[entry["capability"]] = entry["state"]
        self._check_capabilities(new, old_postcopy=self._caps["postcopy-ram"], runstate=runstate,
                                 incoming_single_channel=incoming_single_channel,
                                 postcopy_supported=postcopy_supported,
                                 uffd_wp_supported=uffd_wp_supported,
                                 ram_wp_compatible=ram_wp_compatible)
        self._caps = new

    def enable_block(self, incremental: bool) -> None:
        """``migrate blk/inc``: migrate_set_block_enabled(true), with the capability checks, and
        ``block-incremental`` for ``inc`` (migrate_prepare, migration/migration.c)."""
        new = dict(self._caps)
        new["block"] = True
        self._check_capabilities(new, old_postcopy=self._caps["postcopy-ram"], runstate="running",
                                 incoming_single_channel=False, postcopy_supported=lambda: True,
                                 uffd_wp_supported=lambda: True, ram_wp_compatible=lambda: True)
        self._caps = new
        if incremental:
            self._params["block-incremental"] = True

    def disable_block(self) -> None:
        """block_cleanup_parameters: what ``migrate blk/inc`` turned on is off again."""
        self._caps["block"] = False
        self._params["block-incremental"] = False

    def _check_capabilities(self, c: dict[str, bool], *, old_postcopy: bool, runstate: str,
                            incoming_single_channel: bool,
                            postcopy_supported: Callable[[], bool],
                            uffd_wp_supported: Callable[[], bool],
                            ram_wp_compatible: Callable[[], bool]) -> None:
        if c["postcopy-ram"]:
            if not old_postcopy and runstate == "inmigrate" and not postcopy_supported():
                raise MigrationError("Postcopy is not supported")
            if c["x-ignore-shared"]:
                raise MigrationError("Postcopy is not compatible with ignore-shared")
        if c["background-snapshot"]:
            if not uffd_wp_supported():
                raise MigrationError("Background-snapshot is not supported by host kernel")
            if not ram_wp_compatible():
                raise MigrationError("Background-snapshot is not compatible with guest memory configuration")
            for other in BACKGROUND_SNAPSHOT_INCOMPATIBLE:
                if c[other]:
                    raise MigrationError(f"Background-snapshot is not compatible with {other}")
        if c["zero-copy-send"]:
            if not self._linux:
                raise MigrationError(ZERO_COPY_NOT_LINUX)
            if (not c["multifd"] or c["compress"] or c["xbzrle"]
                    or self._params["multifd-compression"] != "none" or self._params["tls-creds"]):
                raise MigrationError(ZERO_COPY_UNAVAILABLE)
        if runstate == "inmigrate" and incoming_single_channel and c["multifd"]:
            raise MigrationError("multifd is not supported by current protocol")
        if c["postcopy-preempt"]:
            if not c["postcopy-ram"]:
                raise MigrationError("Postcopy preempt requires postcopy-ram")
            if c["compress"]:
                raise MigrationError("Postcopy preempt not compatible with compress")
        if c["multifd"] and c["compress"]:
            raise MigrationError("Multifd is not compatible with compress")

    def snapshot(self) -> MigrationConfig:
        """The typed, frozen view a migration attempt runs with (:mod:`.config`)."""
        caps = Capabilities(**{f.replace("-", "_"): self._caps[f] for f in self._caps})
        params = {name.replace("-", "_"): self.param(name) for name in self._params}
        if params["block_bitmap_mapping"] is not None:
            params["block_bitmap_mapping"] = tuple(params["block_bitmap_mapping"])
        return MigrationConfig(caps, Parameters(**params))

    # -- parameters --------------------------------------------------------

    def query_parameters(self) -> dict:
        """``query-migrate-parameters``: every member, tls-* as strings."""
        out = {}
        for name, value in self._params.items():
            if name == "block-bitmap-mapping":
                if value is not None:
                    out[name] = copy.deepcopy(value)
            elif name == "tls-authz":
                out[name] = value or ""
            else:
                out[name] = value
        return out

    def param(self, name: str) -> Any:
        """Current value by QMP name; unset tls-authz reads as ``""``, absent mapping as None."""
        value = self._params[name]
        if name == "tls-authz" and value is None:
            return ""
        return copy.deepcopy(value) if name == "block-bitmap-mapping" else value

    @property
    def tls_authz_unset(self) -> bool:
        return self._params["tls-authz"] is None

    def set_parameters(self, params: dict) -> list[str]:
        """Apply ``migrate-set-parameters`` atomically; ``params`` is already type-checked.

        Returns the names that were applied, in schema order.  A member counts
        as applied whenever it is present, even with its current value,
        because QEMU's side effects (re-arming the rate limit, forcing a COLO
        checkpoint) fire on presence, not on change.
        """
        if not self._zstd and params.get("multifd-compression") == "zstd":
            raise MigrationError("Parameter 'multifd-compression' does not accept value 'zstd'")
        request = {
            name: ("" if value is None and name in _NULL_MEANS_EMPTY else value)
            for name, value in params.items()
        }
        merged = dict(self._params)
        merged.update(request)
        self._check_parameters(merged)
        applied = [name for name in _names().settable if name in request]
        for name in applied:
            self._params[name] = copy.deepcopy(request[name])
        return applied

    def _check_parameters(self, p: dict[str, Any]) -> None:
        for rule in _PARAM_RULES:
            if rule.invalid(p):
                raise MigrationError(rule.message())
        if p["block-bitmap-mapping"] is not None:
            check_bitmap_mapping(p["block-bitmap-mapping"])
        if self._caps["zero-copy-send"] and (p["multifd-compression"] != "none" or p["tls-creds"]):
            raise MigrationError(ZERO_COPY_UNAVAILABLE)
