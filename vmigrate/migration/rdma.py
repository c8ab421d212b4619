"""``rdma:HOST:PORT``: the answers of QEMU 7.2's RDMA transport (migration/rdma.c) up to the
point where it needs an RDMA device.

QEMU parses the address, checks the host, then opens the RDMA connection
manager (librdmacm's ``rdma_create_event_channel``), which fails where the
kernel offers no RDMA device: the command fails with that ``RDMA ERROR``
text and an outgoing attempt ends in ``failed`` with it as ``error-desc``.
vmigrate gives exactly those answers.  Moving RAM over RDMA verbs is not
built: where a device exists (a real HCA or soft-RoCE) vmigrate says so.
"""

from __future__ import annotations

import os

from vmigrate.migration.errors import MigrationError

#: Where the kernel lists RDMA devices, and the connection manager's device node.
INFINIBAND_CLASS = "/sys/class/infiniband"
RDMA_CM_DEVICE = "/dev/infiniband/rdma_cm"
NOT_BUILT = "vmigrate does not implement RDMA migration yet"


def bad_address(host_port: str) -> MigrationError:
    """qemu_rdma_data_init: the address is not ``HOST:PORT[,options]``."""
    return MigrationError(f"RDMA ERROR: bad RDMA migration address '{host_port}'")


def device_present() -> bool:
    """Whether ``rdma_create_event_channel`` could succeed: a device and the CM node."""
    try:
        devices = os.listdir(INFINIBAND_CLASS)
    except OSError:
        return False
    return bool(devices) and os.path.exists(RDMA_CM_DEVICE)


def refusal(host: str, incoming: bool) -> MigrationError:
    """Why a parsed rdma: address cannot be used (qemu_rdma_dest_init / qemu_rdma_resolve_host)."""
    if not host:
        return MigrationError("RDMA ERROR: RDMA host is not set!" if incoming
                              else "RDMA ERROR: RDMA hostname has not been set")
    if device_present():
        return MigrationError(NOT_BUILT)
    return MigrationError("RDMA ERROR: could not create rdma event channel" if incoming
                          else "RDMA ERROR: could not create CM channel")
