"""Opening an image by format name, with its backing chain (QEMU's bdrv_open_backing_file)."""

from __future__ import annotations

import os

from vmigrate.block.driver import BlockDriver, ImageError
from vmigrate.block.qcow2 import Qcow2Image
from vmigrate.block.qcow2_format import MAGIC
from vmigrate.block.raw import RawImage

#: Deeper chains are refused rather than followed (also stops a chain that loops).
MAX_CHAIN_DEPTH = 64


def open_image(driver: str, filename: str, *, read_only: bool = False,
               backing: "BlockDriver | None | str" = "default") -> BlockDriver:
    """Open ``filename`` as ``driver`` ("raw" or "qcow2").

    ``backing``: "default" opens the backing file a qcow2 header names (relative to the
    image's directory, in the format its backing-format extension gives, else probed),
    read-only; None opens no backing image; a driver is used as the backing image.
    """
    return _open(driver, filename, read_only, backing, 0)


def _open(driver: str, filename: str, read_only: bool, backing: "BlockDriver | None | str",
          depth: int) -> BlockDriver:
    if driver == "raw":
        return RawImage(filename, read_only)
    if driver != "qcow2":
        raise ImageError(f"Unknown driver '{driver}'")
    image = Qcow2Image(filename, read_only)
    if isinstance(backing, BlockDriver):
        image.backing = backing
    elif backing == "default" and image.backing_file:
        try:
            image.backing = _open_backing(image, depth)
        except BaseException:
            image.close()
            raise
        image.owns_backing = True
    elif backing not in (None, "default"):
        image.close()
        raise ImageError(f"Invalid backing option {backing!r}")
    return image


def _open_backing(image: Qcow2Image, depth: int) -> BlockDriver:
    if depth + 1 >= MAX_CHAIN_DEPTH:
        raise ImageError(f"Backing chain of '{image.filename}' deeper than {MAX_CHAIN_DEPTH}")
    name = image.backing_file or ""
    path = name if os.path.isabs(name) else os.path.join(
        os.path.dirname(image.filename), name)
    try:
        return _open(image.backing_format or probe(path), path, True, "default", depth + 1)
    except ImageError as err:
        raise ImageError(f"Could not open backing file '{name}' of '{image.filename}': "
                         f"{err}") from None


def probe(path: str) -> str:
    """"qcow2" by its magic, else "raw" (QEMU's format probing, for images without the
    backing-format extension)."""
    try:
        with open(path, "rb") as f:
            return "qcow2" if f.read(4) == MAGIC else "raw"
    except OSError as err:
        raise ImageError(f"Could not open '{path}': {err.strerror}") from None
