"""Xen/COLO block replication commands (qapi/migration.json, QEMU's migration/colo.c).

QEMU acts on every ``replication`` block node (block/replication.c) and on
the COLO filters of every netdev.  vmigrate opens neither kind, so, like a
QEMU that has none, starting or stopping replication and a checkpoint have
nothing to act on and succeed, and the status never reports an error.
"""

from __future__ import annotations

from vmigrate.commands import command
from vmigrate.qmp.errors import QMPError


@command("xen-set-replication")
def xen_set_replication(vm, args, monitor):
    """QEMU's qmp_xen_set_replication: ``failover`` only makes sense when stopping."""
    if "failover" in args and args["enable"]:
        raise QMPError("Parameter 'failover' is only for stopping replication")


@command("query-xen-replication-status")
def query_xen_replication_status(vm, args, monitor):
    """No replication node has failed, there being none (replication_get_error_all)."""
    return {"error": False}


@command("xen-colo-do-checkpoint")
def xen_colo_do_checkpoint(vm, args, monitor):
    """No replication node and no COLO filter to notify of the checkpoint."""
