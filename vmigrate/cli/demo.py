"""``vmigrate demo``: the whole story in one command.

Starts two VM processes, a guest dirtying memory on the source, migrates it
live over tcp loopback with the live view, then shows that the guest goes on
running on the destination.  The guest's progress is read from its RAM
(file-backed), so what is shown is what the guest itself wrote.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from vmigrate.cli.main import CLIError
from vmigrate.cli.migrate import JsonRecords, drive, parse_params
from vmigrate.harness.launcher import VMProcess, VMStartError, vmigrate_argv
from vmigrate.harness.migrate import MigrationRun
from vmigrate.machine import kvm
from vmigrate.machine.guest import read_header
from vmigrate.qmp.client import QMPClientError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="live-migrate a running guest between two local VM processes")
    p.add_argument("-m", "--memory", default="512M", help="guest RAM (default 512M)")
    p.add_argument("--guest", default="ab:end=64M", help="workload of the guest (default: the ab pattern "
                   "over [1 MiB, 64 MiB), one console letter per pass under KVM)")
    p.add_argument("--accel", choices=("auto", "kvm", "soft"), default="auto",
                   help="vCPU backend of both VMs (auto: KVM where /dev/kvm works)")
    p.add_argument("--max-bandwidth", default="256M", help="migration bandwidth limit per second")
    p.add_argument("--json", action="store_true",
                   help="JSON records (docs/client-json.md) instead of the live view and summary table")
    p.set_defaults(func=run)


class DemoVM(VMProcess):
    """A ``vmigrate run`` child whose guest can be watched: RAM in a file, UART output (KVM) in another."""

    def __init__(self, workdir: Path, name: str, accel: str, *args: str) -> None:
        self.ram_file = workdir / f"{name}.ram"
        self.console = workdir / f"{name}.console" if accel == "kvm" else None
        serial = ["--serial", str(self.console)] if self.console else []
        sock = workdir / f"{name}.qmp"
        argv = vmigrate_argv(sock, "--name", name, "--accel", accel, "--mem-path", str(self.ram_file), *serial, *args)
        try:
            super().__init__(argv, sock, workdir / f"{name}.log")
        except VMStartError as err:
            raise CLIError(f"VM '{name}' did not start; see {err.log_path}") from None

    def guest_steps(self) -> int | None:
        return read_header(str(self.ram_file))

    def console_tail(self, width: int = 40) -> str:
        """The end of what the guest printed on its UART (KVM guests only)."""
        if self.console is None or not self.console.exists():
            return "-"
        return self.console.read_bytes()[-width:].decode("ascii", "replace") or "-"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    with tempfile.TemporaryDirectory(prefix="vmigrate-demo-") as tmp:
        workdir = Path(tmp)
        accel = args.accel if args.accel != "auto" else ("soft" if kvm.probe() else "kvm")
        vms: list[DemoVM] = []
        try:
            dst = DemoVM(workdir, "destination", accel, "-m", args.memory, "--guest", args.guest,
                         "--incoming", "tcp:127.0.0.1:0")
            vms.append(dst)
            src = DemoVM(workdir, "source", accel, "-m", args.memory, "--guest", args.guest)
            vms.append(src)
            port = dst.qmp.execute("query-migrate")["socket-address"][0]["port"]
            uri = f"tcp:127.0.0.1:{port}"
            backend = "KVM vCPUs running x86 guest code" if accel == "kvm" else "software vCPUs"
            console.print(f"[bold]source[/] pid {src.pid} and [bold]destination[/] pid {dst.pid} "
                          f"started ({args.memory} RAM, {backend}, guest '{args.guest}'); "
                          f"destination listens on {uri}")
            time.sleep(1.0)
            console.print(f"guest on the source is running: step {src.guest_steps()}, "
                          f"console …{src.console_tail()}")
            run_ = MigrationRun(src.qmp, uri, dst.qmp)
            run_.prepare([{"capability": "auto-converge", "state": True}],
                         parse_params([f"max-bandwidth={args.max_bandwidth}"]))

            def guest_lines() -> list[str]:
                return [f"guest steps: source {src.guest_steps()}, destination {dst.guest_steps()}",
                        f"source console      …{src.console_tail()}",
                        f"destination console …{dst.console_tail()}"]

            summary = drive(run_, 0.2, 300, JsonRecords(args.json), console, guest_lines).summary
            if summary["status"] != "completed" or summary["destination-status"] != "completed":
                raise CLIError(f"migration ended '{summary['status']}': {summary.get('error-desc') or 'see logs'}")
            before = dst.guest_steps()
            time.sleep(1.0)
            after = dst.guest_steps()
            src_state = src.qmp.execute("query-status")["status"]
            dst_state = dst.qmp.execute("query-status")["status"]
            console.print(f"source VM is now '{src_state}'; destination VM is '{dst_state}'")
            if dst_state != "running" or before is None or after is None or after <= before:
                raise CLIError("the guest did not keep running on the destination")
            console.print(f"[green]the guest keeps running on the destination[/]: step {before} → {after} in 1 s; "
                          f"console …{dst.console_tail()}")
            return 0
        except QMPClientError as err:
            raise CLIError(err.desc) from None
        except TimeoutError as err:
            raise CLIError(str(err)) from None
        finally:
            for vm in vms:
                vm.close()
