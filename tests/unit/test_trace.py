"""Trace points (vmigrate/trace.py): QEMU's ``-trace PATTERN`` switch over named points."""

from __future__ import annotations

import logging

import pytest

from vmigrate import trace


@pytest.fixture(autouse=True)
def clean_logging():
    """Each test starts with no point enabled and leaves the ``vmigrate`` logger as it found it."""
    root = logging.getLogger("vmigrate")
    handlers, level = list(root.handlers), root.level
    # An in-process CLI run of an earlier test may have left its handler, on a stream now closed.
    root.handlers[:] = []
    trace.reset()
    yield
    trace.reset()
    root.handlers[:] = handlers
    root.setLevel(level)


def traced(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == trace.TRACE_LOGGER]


def test_enabled_points_log_their_fields_at_debug(caplog):
    trace.enable("migrate_set_state")
    trace.trace("migrate_set_state", new_state="active")
    trace.trace("qemu_savevm_send_packaged", size=4096)
    assert traced(caplog) == ["migrate_set_state new_state=active"]
    assert caplog.records[0].levelno == logging.DEBUG


def test_nothing_is_traced_by_default(caplog):
    caplog.set_level(logging.DEBUG)
    trace.trace("migrate_set_state", new_state="active")
    assert traced(caplog) == []
    assert not trace.enabled("migrate_set_state")


def test_patterns_are_globs_comma_separated_and_add_up():
    trace.enable("migrate_*, ram_save_*")
    trace.enable("savevm_section_start")
    assert trace.enabled("migrate_set_state")
    assert trace.enabled("ram_save_iterate_big_wait")
    assert trace.enabled("savevm_section_start")
    assert not trace.enabled("savevm_section_end")
    assert not trace.enabled("migration_thread_setup_complete")
    trace.reset()
    assert not trace.enabled("migrate_set_state")


def test_fields_with_blanks_are_quoted(caplog):
    trace.enable("*")
    trace.trace("migration_completion_file_err", error="Broken pipe", detail="")
    assert traced(caplog) == ["migration_completion_file_err error='Broken pipe' detail=''"]


def test_setup_logging_prints_traces_and_warnings_to_stderr(capsys):
    trace.setup_logging(0, ["loadvm_*"])
    trace.trace("loadvm_state_setup")
    trace.trace("savevm_section_start", section="ram")
    logging.getLogger("vmigrate.migration.example").warning("capability %s ignored", "x")
    logging.getLogger("vmigrate.migration.example").error("load failed")
    logging.getLogger("vmigrate.migration.example").info("not shown without -v")
    assert capsys.readouterr().err.splitlines() == [
        "loadvm_state_setup", "vmigrate: warning: capability x ignored", "vmigrate: load failed"]


def test_setup_logging_again_replaces_the_handler_and_the_patterns(capsys):
    trace.setup_logging(0, ["ram_*"])
    trace.setup_logging(1, ["migrate_*"])
    trace.trace("ram_save_iterate_big_wait")
    trace.trace("migrate_set_state", new_state="setup")
    logging.getLogger("vmigrate.example").info("shown with -v")
    assert capsys.readouterr().err.splitlines() == [
        "migrate_set_state new_state=setup", "vmigrate: info: shown with -v"]
