"""Opening an image by format name."""

from __future__ import annotations

from vmigrate.block.driver import BlockDriver, ImageError
from vmigrate.block.raw import RawImage


def open_image(driver: str, filename: str, *, read_only: bool = False,
               backing: "BlockDriver | None | str" = "default") -> BlockDriver:
    if driver == "raw":
        return RawImage(filename, read_only)
    raise ImageError(f"Unknown driver '{driver}'")
