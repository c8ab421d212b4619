"""parse_uri for vsock: and rdma:, with QEMU 7.2's texts (util/qemu-sockets.c, migration/rdma.c).

The same answers are compared with a live QEMU in tests/conformance/test_migration_commands.py;
these pin the parsing rules without one.
"""

from __future__ import annotations

import pytest

from vmigrate.migration import rdma
from vmigrate.migration.channel import ChannelError, MigrationAddress, parse_uri, vsock_sockaddr
from vmigrate.migration.errors import MigrationError


@pytest.mark.parametrize("uri, desc", [
    ("vsock:", "error parsing address ''"), ("vsock:1", "error parsing address '1'"),
    ("vsock::1", "error parsing address ':1'"), ("vsock:1:", "error parsing address '1:'"),
    ("vsock:1:1,x", "trailing characters in address '1:1,x'"),
    ("vsock:1:" + "9" * 33, "trailing characters in address '1:" + "9" * 33 + "'"),
])
def test_vsock_syntax(uri, desc):
    with pytest.raises(MigrationError) as err:
        parse_uri(uri)
    assert err.value.desc == desc


def test_vsock_numbers_checked_when_opened():
    assert parse_uri("vsock:x:1") == MigrationAddress("vsock", cid="x", port="1")
    assert vsock_sockaddr(parse_uri("vsock: +2:4294967295")) == (2, 0xFFFFFFFF)
    for uri, desc in (("vsock:x:1", "Failed to parse cid 'x'"), ("vsock:-1:1", "Failed to parse cid '-1'"),
                      ("vsock:1:x", "Failed to parse port 'x'"), ("vsock:1:4294967296", "Failed to parse port "
                                                                                       "'4294967296'")):
        with pytest.raises(ChannelError, match=f"^{desc}$"):
            vsock_sockaddr(parse_uri(uri))


@pytest.mark.parametrize("uri, outgoing, incoming", [
    ("rdma:", "RDMA ERROR: bad RDMA migration address ''", None),
    ("rdma:[::1", "RDMA ERROR: bad RDMA migration address '[::1'", None),
    ("rdma:h:1,to=x", "RDMA ERROR: bad RDMA migration address 'h:1,to=x'", None),
    ("rdma::1", "RDMA ERROR: RDMA hostname has not been set", "RDMA ERROR: RDMA host is not set!"),
    ("rdma:127.0.0.1:1", "RDMA ERROR: could not create CM channel",
     "RDMA ERROR: could not create rdma event channel"),
])
def test_rdma_without_device(monkeypatch, uri, outgoing, incoming):
    monkeypatch.setattr(rdma, "device_present", lambda: False)
    for is_incoming, desc in ((False, outgoing), (True, incoming or outgoing)):
        with pytest.raises(MigrationError) as err:
            parse_uri(uri, incoming=is_incoming)
        assert err.value.desc == desc


def test_rdma_with_device_is_not_built(monkeypatch):
    monkeypatch.setattr(rdma, "device_present", lambda: True)
    with pytest.raises(MigrationError) as err:
        parse_uri("rdma:127.0.0.1:1")
    assert err.value.desc == rdma.NOT_BUILT
