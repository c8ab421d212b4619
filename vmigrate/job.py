"""Generic jobs (QEMU's job.c, job-qmp.c): ids, the status machine, its events and verbs.

Snapshot jobs (docs/qemu/snapshot-jobs.md §2) are the only kind vmigrate
runs: created with manual dismiss and automatic finalize, their work done
in one step on the monitor's thread, so that by the time a client can name
a job it has concluded.  The statuses, the JOB_STATUS_CHANGE events and the
verb table are QEMU's all the same, for clients that drive any job the
generic way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from vmigrate.errors import VMError

#: Where each verb is legal (QEMU's JobVerbTable).
VERBS: dict[str, frozenset[str]] = {
    "cancel": frozenset({"created", "running", "paused", "ready", "standby", "waiting", "pending"}),
    "pause": frozenset({"created", "running", "paused", "ready", "standby"}),
    "resume": frozenset({"created", "running", "paused", "ready", "standby"}),
    "set-speed": frozenset({"created", "running", "paused", "ready", "standby"}),
    "complete": frozenset({"ready", "standby"}),
    "finalize": frozenset({"pending"}),
    "dismiss": frozenset({"concluded"}),
}

_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")


@dataclass
class Job:
    id: str
    type: str
    status: str = "created"
    current_progress: int = 0
    total_progress: int = 0
    error: str | None = None

    def info(self) -> dict:
        """A ``JobInfo``."""
        out = {"current-progress": self.current_progress, "status": self.status,
               "total-progress": self.total_progress, "type": self.type, "id": self.id}
        if self.error is not None:
            out["error"] = self.error
        return out


class JobManager:
    """Every job of one VM, newest last (query-jobs answers newest first)."""

    def __init__(self, emit_event: Callable[[str, dict | None], None]) -> None:
        self._emit = emit_event
        self._jobs: list[Job] = []

    def create(self, job_id: str, job_type: str) -> Job:
        """job_create's checks: a well-formed, unused id."""
        if not _WELL_FORMED.match(job_id):
            raise VMError(f"Invalid job ID '{job_id}'")
        if any(j.id == job_id for j in self._jobs):
            raise VMError(f"Job ID '{job_id}' already in use")
        job = Job(job_id, job_type)
        self._jobs.append(job)
        self._emit_status(job)
        return job

    def run(self, job: Job, work: Callable[[], None], later: Callable[[Callable[[], None]], None]) -> None:
        """Run *work* as the job's one step; *later* runs the statuses that follow the command's reply.

        A :class:`VMError` from the work becomes the job's ``error``; the
        progress reads 1/1 either way, as QEMU's snapshot jobs report.
        """
        self._set(job, "running")
        job.total_progress = 1
        try:
            work()
        except VMError as err:
            job.error = err.desc
        job.current_progress = 1
        if job.error is None:
            later(lambda: [self._set(job, s) for s in ("waiting", "pending", "concluded")])
        else:
            later(lambda: [self._set(job, s) for s in ("aborting", "concluded")])

    def query(self) -> list[dict]:
        return [j.info() for j in reversed(self._jobs)]

    def verb(self, job_id: str, verb: str) -> None:
        """``job-<verb>``: checked against the verb table; only dismiss and finalize act on a snapshot job."""
        job = next((j for j in self._jobs if j.id == job_id), None)
        if job is None:
            raise VMError("Job not found")
        if verb == "resume":
            # Checked before the verb table; a snapshot job is never paused by the user.
            raise VMError("Can't resume a job that was not paused")
        if job.status not in VERBS[verb]:
            raise VMError(f"Job '{job.id}' in state '{job.status}' cannot accept command verb '{verb}'")
        if verb == "dismiss":
            self._set(job, "null")
            self._jobs.remove(job)

    def _set(self, job: Job, status: str) -> None:
        job.status = status
        self._emit_status(job)

    def _emit_status(self, job: Job) -> None:
        self._emit("JOB_STATUS_CHANGE", {"id": job.id, "status": job.status})
