"""Authorization objects for ``tls-authz``: QEMU 7.2's ``authz-simple`` and ``authz-list`` (authz/*.c).

A destination with ``tls-authz`` set asks the object with that id whether
the client certificate's distinguished name may migrate in (docs/tls.md,
"Authorizing clients"); the object is looked up at every handshake, as
QEMU's ``qauthz_is_allowed_by_id`` does, so it can be replaced while the
destination listens.  ``authz-listfile`` and ``authz-pam`` are not built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

POLICIES = ("deny", "allow")
FORMATS = ("exact", "glob")


class AuthzError(ValueError):
    """An ``authz-*`` object that cannot be created (``-object`` stops the process, ``object-add`` fails)."""


@runtime_checkable
class Authz(Protocol):
    """QEMU's QAuthZ interface: whether *identity* (here a certificate's DN) is allowed."""

    def is_allowed(self, identity: str) -> bool: ...


def _check_keys(options: Mapping[str, str], known: set[str]) -> None:
    """QEMU's object property visitor refuses what the type does not have, with this text."""
    unknown = sorted(key for key in options if key not in known)
    if unknown:
        raise AuthzError(f"Invalid parameter '{unknown[0]}'")


def _enum(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise AuthzError(f"Parameter '{name}' does not accept value '{value}'")
    return value


def glob_match(pattern: str, identity: str) -> bool:
    """GLib's ``g_pattern_match_simple``, which QEMU's ``format=glob`` uses: ``*`` is any run of
    characters, ``?`` any one character, everything else (``[``, ``\\`` too) only itself."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, identity, re.DOTALL) is not None


@dataclass(frozen=True)
class SimpleAuthz:
    """``authz-simple``: exactly one identity is allowed (authz/simple.c)."""

    id: str
    identity: str

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> "SimpleAuthz":
        """``id=ID,identity=NAME``; QEMU refuses the object without an identity, with this text."""
        _check_keys(options, {"id", "identity"})
        if "identity" not in options:
            raise AuthzError("The 'identity' property must be set")
        return cls(options["id"], options["identity"])

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


@dataclass(frozen=True)
class ListRule:
    """One QAPI ``QAuthZListRule``."""

    match: str
    policy: str
    format: str = "exact"

    def matches(self, identity: str) -> bool:
        return glob_match(self.match, identity) if self.format == "glob" else identity == self.match


@dataclass(frozen=True)
class ListAuthz:
    """``authz-list``: the first rule that matches decides, else the default policy (authz/list.c)."""

    id: str
    policy: str
    rules: tuple[ListRule, ...]

    @classmethod
    def from_options(cls, options: Mapping[str, str]) -> "ListAuthz":
        """``id=ID[,policy=allow|deny][,rules.N.match=M,rules.N.policy=P[,rules.N.format=exact|glob]]...``.

        The rules are spelled as QEMU's keyval syntax spells a list (QMP's
        ``object-add`` takes them as a JSON list, which flattens to the same
        keys).  QEMU 7.2's ``qemu-system -object`` does not take these keys
        (``Invalid parameter 'rules.0.match'``) and needs the JSON form there
        (docs/tls.md).  Indexes must run 0, 1, ... without gaps, as keyval requires.
        """
        flat = {key: value for key, value in options.items() if not key.startswith("rules.")}
        _check_keys(flat, {"id", "policy"})
        policy = _enum("policy", flat.get("policy", "deny"), POLICIES)
        by_index: dict[int, dict[str, str]] = {}
        for key, value in options.items():
            if not key.startswith("rules."):
                continue
            index, _, field = key[len("rules."):].partition(".")
            if not index.isdigit() or field not in ("match", "policy", "format"):
                raise AuthzError(f"Invalid parameter '{key}'")
            by_index.setdefault(int(index), {})[field] = value
        if sorted(by_index) != list(range(len(by_index))):
            raise AuthzError("Parameter 'rules' expects array")
        rules = []
        for n in range(len(by_index)):
            fields = by_index[n]
            for required in ("match", "policy"):
                if required not in fields:
                    raise AuthzError(f"Parameter 'rules[{n}].{required}' is missing")
            rules.append(ListRule(fields["match"], _enum(f"rules[{n}].policy", fields["policy"], POLICIES),
                                  _enum(f"rules[{n}].format", fields.get("format", "exact"), FORMATS)))
        return cls(options["id"], policy, tuple(rules))

    def is_allowed(self, identity: str) -> bool:
        for rule in self.rules:
            if rule.matches(identity):
                return rule.policy == "allow"
        return self.policy == "allow"
