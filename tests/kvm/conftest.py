"""KVM guests: skipped, with one line saying why, where /dev/kvm cannot run a VM."""

from __future__ import annotations

import pytest

from vmigrate.machine.kvm import probe


@pytest.fixture(scope="session", autouse=True)
def kvm_available(request) -> None:
    reason = probe()
    if reason is not None:
        line = f"KVM unavailable here: {reason}; the software vCPU covers these scenarios (tests/integration)"
        plugins = request.config.pluginmanager
        reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(line)
        pytest.skip(line)
