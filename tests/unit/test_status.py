"""MigrationStatus: one transition table, compare-and-swap changes, events only for real changes."""

from __future__ import annotations

import pytest

from vmigrate.migration.status import TRANSITIONS, IllegalTransition, MigrationStatus, StatusMachine
from vmigrate.qapi.schema import load

S = MigrationStatus


def machine(events: bool = True) -> tuple[StatusMachine, list]:
    sent: list = []
    return StatusMachine(lambda name, data: sent.append((name, data)), lambda: events), sent


def test_enum_and_table_cover_the_schema():
    assert [s.value for s in S] == load().enum_values("MigrationStatus")
    assert set(TRANSITIONS) == set(S)


def test_a_precopy_with_switchover_pause_emits_each_status_once():
    m, sent = machine()
    for old, new in [(S.NONE, S.SETUP), (S.SETUP, S.ACTIVE), (S.ACTIVE, S.PRE_SWITCHOVER),
                     (S.PRE_SWITCHOVER, S.DEVICE), (S.DEVICE, S.COMPLETED)]:
        assert m.transition(old, new)
    assert [d["status"] for _, d in sent] == ["setup", "active", "pre-switchover", "device", "completed"]
    assert {name for name, _ in sent} == {"MIGRATION"}


def test_a_lost_race_changes_nothing_and_is_silent():
    m, sent = machine()
    m.transition(S.NONE, S.SETUP)
    m.transition(S.SETUP, S.CANCELLING)
    assert not m.transition(S.SETUP, S.ACTIVE)
    assert m.status is S.CANCELLING and len(sent) == 2


def test_an_illegal_transition_raises_even_when_the_status_matches():
    m, _ = machine()
    with pytest.raises(IllegalTransition):
        m.transition(S.NONE, S.COMPLETED)
    m.transition(S.NONE, S.SETUP)
    m.transition(S.SETUP, S.FAILED)
    with pytest.raises(IllegalTransition):
        m.transition(S.FAILED, S.ACTIVE)
    assert m.status is S.FAILED


def test_fail_from_any_status_that_allows_it():
    m, sent = machine(events=False)
    m.transition(S.NONE, S.SETUP)
    m.transition(S.SETUP, S.ACTIVE)
    assert m.fail() and m.status is S.FAILED
    assert not m.fail()
    assert sent == []


def test_running_statuses():
    assert {s for s in S if s.is_running} == {
        S.SETUP, S.ACTIVE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER, S.PRE_SWITCHOVER,
        S.DEVICE, S.WAIT_UNPLUG, S.CANCELLING}
