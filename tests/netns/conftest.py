"""Two hosts on one machine: network namespaces joined by a veth pair, made and removed per test.

The source runs in one namespace, the destination in the other, so a migration crosses a
real link that a test can cut (``ip link set ... down``), which loopback cannot do.  Where
namespaces cannot be made (no root, no ``ip``), the tests skip with one line.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from vmigrate.harness.launcher import VMProcess, vmigrate_argv

_ids = itertools.count()
#: The link's subnet: addresses that exist only inside the namespaces the fixture makes.
SUBNET = "10.213.77"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def _namespaces_work() -> str | None:
    """None when namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "no 'ip' command"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"vmigrate-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as err:
        return f"'ip netns add' failed: {err.stderr.decode().strip()}"
    _ip("netns", "del", probe)
    return None


@dataclass
class Host:
    """One namespace: its name, its end of the link, its address."""

    netns: str
    link: str
    address: str

    def run(self, sock: Path, log: Path, *args: str) -> VMProcess:
        """``vmigrate run`` in this namespace (QMP on a unix socket, reachable from every namespace)."""
        return VMProcess(["ip", "netns", "exec", self.netns, *vmigrate_argv(sock, "--accel", "soft", *args)],
                         sock, log)

    def set_link(self, up: bool) -> None:
        _ip("-n", self.netns, "link", "set", self.link, "up" if up else "down")


@pytest.fixture
def two_hosts():
    """(source host, destination host) joined by a veth pair; both namespaces removed afterwards."""
    why = _namespaces_work()
    if why is not None:
        pytest.skip(f"network namespaces unavailable ({why}); the loopback tests cover the same scenarios")
    n = next(_ids)
    names = [f"vmig{os.getpid()}-{n}{side}" for side in "ab"]
    hosts = [Host(names[0], f"vm{n}a{os.getpid() % 10000}", f"{SUBNET}.1"),
             Host(names[1], f"vm{n}b{os.getpid() % 10000}", f"{SUBNET}.2")]
    try:
        for host in hosts:
            _ip("netns", "add", host.netns)
        _ip("link", "add", hosts[0].link, "netns", hosts[0].netns, "type", "veth",
            "peer", "name", hosts[1].link, "netns", hosts[1].netns)
        for host in hosts:
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", host.link)
            _ip("-n", host.netns, "link", "set", host.link, "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            subprocess.run(["ip", "netns", "del", host.netns], capture_output=True, timeout=10)
