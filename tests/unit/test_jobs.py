"""The job status machine and verb table (vmigrate/job.py), with the events it sends."""

from __future__ import annotations

import pytest

from vmigrate.errors import VMError
from vmigrate.job import JobManager


@pytest.fixture
def jobs():
    events: list[tuple] = []
    later: list = []
    manager = JobManager(lambda name, data: events.append((data["id"], data["status"])))
    return manager, events, later


def test_success_runs_the_statuses_after_the_reply(jobs):
    manager, events, later = jobs
    job = manager.create("s0", "snapshot-save")
    manager.run(job, lambda: None, later.append)
    assert events == [("s0", "created"), ("s0", "running")]
    assert job.current_progress == job.total_progress == 1
    later.pop()()
    assert [s for _, s in events[2:]] == ["waiting", "pending", "concluded"]
    assert manager.query() == [{"current-progress": 1, "status": "concluded", "total-progress": 1,
                                "type": "snapshot-save", "id": "s0"}]
    manager.verb("s0", "dismiss")
    assert events[-1] == ("s0", "null") and manager.query() == []


def test_failure_keeps_the_error(jobs):
    manager, events, later = jobs

    def fail() -> None:
        raise VMError("At least one device is required for snapshot")

    job = manager.create("l0", "snapshot-load")
    manager.run(job, fail, later.append)
    later.pop()()
    assert [s for _, s in events] == ["created", "running", "aborting", "concluded"]
    assert manager.query()[0]["error"] == "At least one device is required for snapshot"


@pytest.mark.parametrize("job_id", ["1bad", "", "a b", "-x", "é"])
def test_ids_must_be_well_formed(jobs, job_id):
    with pytest.raises(VMError, match=f"Invalid job ID '{job_id}'"):
        jobs[0].create(job_id, "snapshot-save")


def test_ids_are_unique_and_verbs_checked(jobs):
    manager, _, later = jobs
    manager.create("a.b-c_1", "snapshot-delete")
    with pytest.raises(VMError, match="Job ID 'a.b-c_1' already in use"):
        manager.create("a.b-c_1", "snapshot-save")
    with pytest.raises(VMError, match="Job not found"):
        manager.verb("other", "cancel")
    with pytest.raises(VMError, match="Job 'a.b-c_1' in state 'created' cannot accept command verb 'dismiss'"):
        manager.verb("a.b-c_1", "dismiss")
    newest = manager.create("z", "snapshot-save")
    assert [j["id"] for j in manager.query()] == [newest.id, "a.b-c_1"]
