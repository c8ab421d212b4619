"""Job commands and the snapshot jobs (QEMU's job-qmp.c; migration/savevm.c's qmp_snapshot_*)."""

from __future__ import annotations

from vmigrate.commands import command
from vmigrate.migration import snapshot


@command("query-jobs")
def query_jobs(vm, args, monitor):
    return vm.jobs.query()


def _verb(verb: str):
    def handler(vm, args, monitor):
        vm.jobs.verb(args["id"], verb)
    return handler


for _name in ("pause", "resume", "cancel", "complete", "dismiss", "finalize"):
    command(f"job-{_name}")(_verb(_name))


def _run(vm, args, job_type: str, work) -> None:
    """The job is created (the only synchronous failure), then does its whole work before the reply;
    the statuses after ``running`` follow the reply, as QEMU 7.2 sends them."""
    job = vm.jobs.create(args["job-id"], job_type)
    vm.jobs.run(job, work, vm.loop.call_soon)


@command("snapshot-save")
def snapshot_save(vm, args, monitor):
    host = vm.migration.host
    _run(vm, args, "snapshot-save", lambda: snapshot.save(
        host, vm.migration.snapshot_session, args["tag"], args["vmstate"], args["devices"], vm.clock.now_ns()))


@command("snapshot-load")
def snapshot_load(vm, args, monitor):
    host = vm.migration.host
    _run(vm, args, "snapshot-load", lambda: snapshot.load(
        host, vm.migration.options.snapshot(), args["tag"], args["vmstate"], args["devices"]))


@command("snapshot-delete")
def snapshot_delete(vm, args, monitor):
    _run(vm, args, "snapshot-delete", lambda: snapshot.delete(vm.migration.host, args["tag"], args["devices"]))
