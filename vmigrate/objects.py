"""User-creatable objects: QEMU's ``/objects`` container, filled by ``-object`` and ``object-add``.

An object is created from its type's properties (strings, as ``-object``
gives them; QMP's booleans and numbers are turned into the same strings) and
kept by id; the engines look objects up by id through a read-only
:class:`~typing.Mapping` (the ``tls-creds`` and ``tls-authz`` parameters name
them).  The types known here are the ones migration uses; QEMU's texts for
the refusals are in ``qom/object_interfaces.c``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from vmigrate.errors import VMError
from vmigrate.migration.authz import AuthzError, ListAuthz, SimpleAuthz
from vmigrate.migration.tls import AnonCreds, PskCreds, TlsCreds, TlsCredsError
from vmigrate.qapi.schema import load as load_schema

#: Each type's constructor: properties (without ``qom-type``) -> the object.
OBJECT_TYPES: dict[str, Callable[[Mapping[str, str]], object]] = {
    "tls-creds-x509": TlsCreds.from_options,
    "tls-creds-psk": PskCreds.from_options,
    "tls-creds-anon": AnonCreds.from_options,
    "authz-simple": SimpleAuthz.from_options,
    "authz-list": ListAuthz.from_options,
}


class DuplicateObject(VMError):
    """An id already in use; ``-object`` and ``object-add`` word this differently."""


def flat_properties(props: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``object-add``'s typed properties as ``-object`` spells them (QEMU visits both into the same
    object): booleans ``on``/``off``, lists and nested objects as dotted keys (``rules.0.match``)."""
    out: dict[str, str] = {}
    for key, value in props.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_properties(value, f"{name}."))
        elif isinstance(value, list):
            out.update(flat_properties({str(i): v for i, v in enumerate(value)}, f"{name}."))
        elif isinstance(value, bool):
            out[name] = "on" if value else "off"
        else:
            out[name] = str(value)
    return out


class UserObjects(Mapping[str, object]):
    def __init__(self) -> None:
        self._objects: dict[str, object] = {}
        self._lock = threading.Lock()

    def add(self, qom_type: str, props: Mapping[str, str]) -> object:
        """Create an object of *qom_type* from *props* (which hold its ``id``); VMError if refused."""
        factory = OBJECT_TYPES.get(qom_type)
        if factory is None:
            if qom_type in load_schema().enum_values("ObjectType"):
                raise VMError(f"vmigrate does not implement objects of type '{qom_type}' yet")
            raise VMError(f"Parameter 'qom-type' does not accept value '{qom_type}'" if qom_type
                          else "Parameter 'qom-type' is missing")
        obj_id = props.get("id")
        if obj_id is None:
            raise VMError("Parameter 'id' is missing")
        if obj_id in self._objects:
            raise DuplicateObject(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
        try:
            obj = factory(props)
        except (TlsCredsError, AuthzError) as err:
            raise VMError(str(err)) from None
        with self._lock:
            if obj_id in self._objects:
                raise DuplicateObject(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
            self._objects[obj_id] = obj
        return obj

    def delete(self, obj_id: str) -> None:
        """``object-del``."""
        with self._lock:
            if self._objects.pop(obj_id, None) is None:
                raise VMError(f"object '{obj_id}' not found")

    def __getitem__(self, obj_id: str) -> object:
        return self._objects[obj_id]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._objects))

    def __len__(self) -> int:
        return len(self._objects)
