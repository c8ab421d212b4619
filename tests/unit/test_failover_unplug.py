"""qemu_savevm_wait_unplug's rules (migration/wait_unplug.py) and the failover primary's plug states."""

from __future__ import annotations

import pytest

from vmigrate.machine.failover import FailoverError, FailoverPairs, FailoverPrimary, FailoverSpec, PlugState
from vmigrate.migration.status import MigrationStatus as S, StatusMachine
from vmigrate.migration.wait_unplug import CANCELLED_POLLS, POLL_S, wait_unplug


class Guest:
    """A guest that finishes its unplug after *polls* polls (never with None)."""

    def __init__(self, polls: int | None) -> None:
        self.polls = polls

    def unplug_pending(self) -> bool:
        return self.polls is None or self.polls > 0

    def poll(self, seconds: float) -> None:
        assert seconds == POLL_S
        if self.polls:
            self.polls -= 1


def machine() -> tuple[StatusMachine, list]:
    sent: list = []
    m = StatusMachine(lambda name, data: sent.append(data["status"]), lambda: True)
    m.transition(S.NONE, S.SETUP)
    return m, sent


def test_nothing_pending_goes_straight_to_active():
    m, sent = machine()
    assert wait_unplug(m, Guest(0), S.SETUP, S.ACTIVE, Guest(0).poll)
    assert sent == ["setup", "active"]


def test_waits_for_the_guest():
    m, sent = machine()
    guest = Guest(3)
    assert wait_unplug(m, guest, S.SETUP, S.ACTIVE, guest.poll)
    assert sent == ["setup", "wait-unplug", "active"] and guest.polls == 0


def test_cancel_waits_for_the_unplug_then_stays_cancelling():
    m, sent = machine()
    guest = Guest(5)

    def poll(seconds: float) -> None:
        m.transition(S.WAIT_UNPLUG, S.CANCELLING)
        guest.poll(seconds)

    assert not wait_unplug(m, guest, S.SETUP, S.ACTIVE, poll)
    assert sent == ["setup", "wait-unplug", "cancelling"] and guest.polls == 0


def test_cancel_gives_up_after_30_s(caplog):
    m, _ = machine()
    guest = Guest(None)
    polls = []

    def poll(seconds: float) -> None:
        m.transition(S.WAIT_UNPLUG, S.CANCELLING)
        polls.append(seconds)

    assert not wait_unplug(m, guest, S.SETUP, S.ACTIVE, poll)
    assert len(polls) == 1 + CANCELLED_POLLS
    assert "partially unplugged device on failure" in caplog.text


def test_primary_plug_states():
    events: list = []
    primary = FailoverPrimary(FailoverSpec("p0", unplug_delay_ms=60_000))
    pairs = FailoverPairs([primary], lambda name, data: events.append((name, data)))
    assert pairs.request_unplug() and pairs.unplug_pending()
    assert events == [("UNPLUG_PRIMARY", {"device-id": "p0"})]
    assert not pairs.request_unplug(), "one request per plug"
    pairs.replug()
    assert primary.state is PlugState.PLUGGED and not pairs.unplug_pending()
    hidden = FailoverPrimary(FailoverSpec("p1"), hidden=True)
    pairs = FailoverPairs([hidden], events.append)
    assert not pairs.request_unplug()
    pairs.negotiated()
    assert hidden.state is PlugState.PLUGGED


@pytest.mark.parametrize("text", ["failover-primary", "e1000,id=x", "failover-primary,id=x,unplug-delay=-1",
                                  "failover-primary,id=x,bus=y"])
def test_spec_errors(text):
    with pytest.raises(FailoverError):
        FailoverSpec.parse(text)


def test_spec():
    assert FailoverSpec.parse("failover-primary,id=h0,unplug-delay=250") == FailoverSpec("h0", 250)
    assert FailoverSpec.parse("failover-primary,id=h0").unplug_delay_ms == 100
