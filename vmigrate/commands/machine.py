"""Run-state, identity and introspection commands (QEMU's qmp-cmds, control, misc)."""

from __future__ import annotations

import os

from vmigrate import QEMU_VERSION
from vmigrate.commands import command
from vmigrate.machine.runstate import NEEDS_RESET
from vmigrate.objects import flat_properties
from vmigrate.qmp.errors import QMPError


@command("query-status")
def query_status(vm, args, monitor):
    state = vm.runstate.state
    return {"status": state, "singlestep": False, "running": state == "running"}


@command("stop")
def stop(vm, args, monitor):
    if vm.runstate.state == "inmigrate":
        vm.runstate.autostart = False
    else:
        vm.runstate.stop("paused")


@command("cont")
def cont(vm, args, monitor):
    state = vm.runstate.state
    if state in NEEDS_RESET:
        raise QMPError("Resetting the Virtual Machine is required")
    if state == "suspended":
        return
    if state == "finish-migrate":
        raise QMPError("Migration is not finalized yet")
    # qmp_cont: the images are taken over again, whether a migration gave them away
    # (source) or left them inactive (late-block-activate destination).
    vm.block.activate_all()
    if state == "inmigrate":
        vm.runstate.autostart = True
    else:
        vm.runstate.start()


@command("quit")
def quit_(vm, args, monitor):
    vm.request_shutdown("host-qmp-quit")


@command("query-name")
def query_name(vm, args, monitor):
    return {} if vm.config.name is None else {"name": vm.config.name}


@command("query-uuid")
def query_uuid(vm, args, monitor):
    return {"UUID": vm.config.uuid or "00000000-0000-0000-0000-000000000000"}


@command("query-version")
def query_version(vm, args, monitor):
    return {"qemu": dict(QEMU_VERSION), "package": vm.package}


@command("query-commands")
def query_commands(vm, args, monitor):
    return vm.schema.query_commands()


@command("query-qmp-schema")
def query_qmp_schema(vm, args, monitor):
    return vm.schema.introspect()


@command("object-add")
def object_add(vm, args, monitor):
    props = dict(args)
    vm.objects.add(props.pop("qom-type"), flat_properties(props))


@command("object-del")
def object_del(vm, args, monitor):
    vm.objects.delete(args["id"])


@command("getfd")
def getfd(vm, args, monitor):
    if not monitor.pending_fds:
        raise QMPError("No file descriptor supplied via SCM_RIGHTS")
    fd = monitor.pending_fds.pop(0)
    name = args["fdname"]
    if name[:1].isdigit():
        os.close(fd)
        raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
    old = monitor.named_fds.pop(name, None)
    if old is not None:
        os.close(old)
    monitor.named_fds[name] = fd


@command("closefd")
def closefd(vm, args, monitor):
    name = args["fdname"]
    fd = monitor.named_fds.pop(name, None)
    if fd is None:
        raise QMPError(f"File descriptor named '{name}' not found")
    os.close(fd)
