"""Block nodes record writes in their dirty bitmaps; the graph finds nodes as QEMU does."""

from __future__ import annotations

import numpy as np
import pytest

from vmigrate.block.driver import ImageError
from vmigrate.block.node import BlockGraph, DirtyBitmap
from vmigrate.block.options import add_blockdev, add_drive, keyval
from vmigrate.errors import VMError

MIB = 1 << 20


@pytest.fixture
def graph(tmp_path):
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(4 * MIB))
    g = BlockGraph()
    add_blockdev(g, f"driver=raw,node-name=n0,file={image}")
    add_drive(g, f"file={image},format=raw,id=drive0,readonly=on")
    yield g
    g.close()


def test_bitmap_marks_whole_granules():
    bitmap = DirtyBitmap("b", 10 * 65536 + 5, 65536)
    assert len(bitmap.bits) == 11
    bitmap.mark(65535, 2)
    bitmap.mark(10 * 65536, 1)
    assert np.flatnonzero(bitmap.bits).tolist() == [0, 1, 10]
    assert bitmap.count() == 3 * 65536
    bitmap.enabled = False
    bitmap.mark(5 * 65536, 1)
    assert bitmap.count() == 3 * 65536


def test_writes_reach_bitmaps_and_trackers(graph):
    node = graph.node("n0")
    bitmap = node.add_bitmap("b0", 4096, persistent=False, disabled=False)
    tracker = node.track(MIB)
    node.write(3 * MIB + 10, b"x" * 5000)
    node.write_zeroes(0, 4096)
    assert node.read(3 * MIB + 10, 5000) == b"x" * 5000
    assert np.flatnonzero(bitmap.bits).tolist() == [0, 768, 769]
    assert np.flatnonzero(tracker.bits).tolist() == [0, 3]
    node.untrack(tracker)
    node.write(MIB, b"y")
    assert np.flatnonzero(tracker.bits).tolist() == [0, 3]


def test_bitmap_add_rules(graph):
    node = graph.node("n0")
    assert node.add_bitmap("b", None, False, True).granularity == 65536
    with pytest.raises(VMError, match="Bitmap already exists: b"):
        node.add_bitmap("b", None, False, False)
    with pytest.raises(VMError, match="Granularity must be power of 2 and at least 512"):
        node.add_bitmap("c", 1000, False, False)
    with pytest.raises(VMError, match="Can't store persistent bitmaps to n0: Operation not supported"):
        node.add_bitmap("c", None, True, False)


def test_lookup_by_device_then_node(graph):
    drive = graph.device("drive0")
    assert graph.lookup("drive0") is drive and drive.node_name.startswith("#block")
    assert graph.lookup("n0") is graph.node("n0")
    assert graph.node("drive0") is None
    assert [b["device"] for b in graph.query_block()] == ["drive0"]
    assert len(graph.query_named_block_nodes()) == 4


def test_options(tmp_path):
    assert keyval("driver=raw,file=a,,b") == {"driver": "raw", "file": "a,b"}
    assert keyval('{"driver": "qcow2", "file": {"driver": "file", "filename": "x"}, "backing": null}') == {
        "driver": "qcow2", "file.driver": "file", "file.filename": "x", "backing": "null"}
    g = BlockGraph()
    with pytest.raises(ImageError, match="Could not open"):
        add_blockdev(g, f"driver=raw,node-name=n,file={tmp_path}/missing")
    with pytest.raises(ImageError, match="Invalid parameter 'bogus'"):
        add_blockdev(g, f"driver=raw,node-name=n,file={tmp_path}/missing,bogus=1")
    image = tmp_path / "i.raw"
    image.write_bytes(bytes(4096))
    add_blockdev(g, f"driver=raw,node-name=n,file.driver=file,file.filename={image}")
    with pytest.raises(ImageError, match="Duplicate nodes with node-name='n'"):
        add_blockdev(g, f"driver=raw,node-name=n,file={image}")
    g.close()
