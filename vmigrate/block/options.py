"""``--blockdev`` and ``--drive``: QEMU's ``-blockdev`` and ``-drive`` spellings, opened into nodes.

``--blockdev driver=qcow2|raw,node-name=NAME,file=PATH[,backing=NODE|null][,read-only=on]``
also takes QEMU's own ``file.driver=file,file.filename=PATH`` and a JSON
object; ``file=PATH`` naming a file rather than a node is vmigrate's
shorthand.  ``--drive file=PATH,format=qcow2|raw,id=ID[,node-name=NAME][,if=none][,readonly=on]``
adds a device (BlockBackend) name, which block migration needs: QEMU sends
device names only (migration/block.c).
"""

from __future__ import annotations

import json

from vmigrate.block.driver import BlockDriver, ImageError
from vmigrate.block.formats import open_image, probe
from vmigrate.block.node import BlockGraph, BlockNode, auto_node_name

FORMATS = ("qcow2", "raw")
_ON = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def keyval(text: str) -> dict[str, str]:
    """``KEY=VALUE,...`` with ``,,`` for a literal comma (QEMU's keyval), or a JSON object."""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError as err:
            raise ImageError(f"invalid JSON: {err}") from None
        if not isinstance(value, dict):
            raise ImageError("a JSON option must be an object")
        return _flatten(value)
    out: dict[str, str] = {}
    for item in text.replace(",,", "\0").split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ImageError(f"Expected '=' after parameter '{key}'")
        out[key] = value.replace("\0", ",")
    return out


def _flatten(value: dict, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            out.update(_flatten(item, f"{prefix}{key}."))
        elif item is None:
            out[prefix + key] = "null"
        elif isinstance(item, bool):
            out[prefix + key] = "on" if item else "off"
        else:
            out[prefix + key] = str(item)
    return out


def _flag(options: dict[str, str], key: str) -> bool:
    value = options.pop(key, "off")
    try:
        return _ON[value]
    except KeyError:
        raise ImageError(f"Parameter '{key}' expects 'on' or 'off'") from None


def _filename(options: dict[str, str]) -> str:
    driver = options.pop("file.driver", "file")
    if driver != "file":
        raise ImageError(f"file.driver '{driver}' is not supported (only 'file')")
    path = options.pop("file.filename", None) or options.pop("file", None)
    if not path:
        raise ImageError("Parameter 'file' is missing")
    return path


def add_blockdev(graph: BlockGraph, text: str) -> BlockNode:
    options = keyval(text)
    driver = options.pop("driver", None)
    if driver is None:
        raise ImageError("Parameter 'driver' is missing")
    if driver not in FORMATS:
        raise ImageError(f"Invalid parameter value for 'driver': '{driver}' (vmigrate opens {' and '.join(FORMATS)})")
    name = options.pop("node-name", None)
    if not name:
        raise ImageError("A block device must be given a node-name")
    filename = _filename(options)
    read_only = _flag(options, "read-only")
    backing = _backing(graph, options.pop("backing", "default"))
    _no_leftovers(options)
    return _add(graph, name, open_image(driver, filename, read_only=read_only, backing=backing))


def add_drive(graph: BlockGraph, text: str) -> BlockNode:
    options = keyval(text)
    filename = _filename(options)
    fmt = options.pop("format", None) or probe(filename)
    if fmt not in FORMATS:
        raise ImageError(f"Unknown driver '{fmt}'")
    interface = options.pop("if", "none")
    if interface != "none":
        raise ImageError(f"if={interface}: vmigrate's machine has no disk controllers; use if=none")
    device = options.pop("id", None) or f"none{len(graph.devices())}"
    name = options.pop("node-name", None)
    read_only = _flag(options, "readonly")
    _no_leftovers(options)
    return _add(graph, name or auto_node_name(), open_image(fmt, filename, read_only=read_only),
                device=device)


def _add(graph: BlockGraph, name: str, driver: BlockDriver, device: str = "") -> BlockNode:
    """The node over an open image (loading its persistent bitmaps), added to the graph."""
    try:
        node = BlockNode(name, driver, device=device)
    except ImageError:
        driver.close()
        raise
    try:
        return graph.add(node)
    except ImageError:
        node.close()
        raise


def _backing(graph: BlockGraph, value: str):
    if value == "default":
        return "default"
    if value in ("", "null"):
        return None
    node = graph.node(value)
    if node is None:
        raise ImageError(f"Cannot find device='' nor node-name='{value}'")
    return node.driver


def _no_leftovers(options: dict[str, str]) -> None:
    if options:
        raise ImageError(f"Invalid parameter '{next(iter(options))}'")
