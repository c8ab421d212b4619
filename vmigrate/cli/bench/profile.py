"""py-spy profiles of a vmigrate run: sampling the processes, and where the data threads spend their time."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from vmigrate.cli.main import CLIError


def start_profiler(pid: int, path: Path) -> subprocess.Popen:
    """py-spy sampling every thread of a running vmigrate process into collapsed stacks."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise CLIError("--profile needs py-spy (pip install py-spy)")
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "200", "--threads", "--idle",
                             "--nonblocking", "--format", "raw", "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_profiler(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")
#: Threads that move migration data; the other threads of a VM process idle during a benchmark.
DATA_THREADS = ("live_migration", "incoming", "multifd", "compress")


def parse_frame(frame: str) -> tuple[str, str]:
    """``func (path:line)`` → (``func (path)``, ``func (path:line)``)."""
    m = FRAME.match(frame)
    if m is None:
        return frame, frame
    where = f"{m['func']} ({m['file']}"
    return where + ")", where + (f":{m['line']})" if m["line"] else ")")


def summarize_profile(path: Path, thread: str, top: int = 12) -> dict:
    """Self and inclusive share of each function in one thread's samples (py-spy ``raw`` format).

    Shares are of that thread's samples, idle included: a thread blocked in
    ``sendall`` shows up as time spent there, which is the point.
    """
    self_n: dict[str, int] = {}
    line_n: dict[str, int] = {}
    incl_n: dict[str, int] = {}
    total = 0
    for row in path.read_text().splitlines():
        stack, _, count = row.rpartition(" ")
        label, _, rest = stack.partition(";")
        if label != thread or not rest:
            continue
        n = int(count)
        total += n
        frames = [parse_frame(f) for f in rest.split(";")]
        leaf_func, leaf_line = frames[-1]
        self_n[leaf_func] = self_n.get(leaf_func, 0) + n
        line_n[leaf_line] = line_n.get(leaf_line, 0) + n
        for func in {func for func, _ in frames if not func.endswith("(threading.py)")}:
            incl_n[func] = incl_n.get(func, 0) + n

    def ranked(counts: dict[str, int]) -> list[list]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [[func, round(100 * n / total, 1)] for func, n in best]

    return {"thread": thread, "samples": total, "self": ranked(self_n) if total else [],
            "self_lines": ranked(line_n) if total else [], "inclusive": ranked(incl_n) if total else []}


def profile_threads(path: Path) -> list[str]:
    """Labels of the threads that move migration data in a py-spy raw file (all threads if none is known)."""
    labels = list(dict.fromkeys(row.partition(";")[0] for row in path.read_text().splitlines() if ";" in row))
    data = [label for label in labels if any(name in label for name in DATA_THREADS)]
    return data or labels


def print_profile(result: dict, console) -> None:
    from rich.table import Table

    for role in ("src", "dst"):
        threads = result.get(role)
        if isinstance(threads, str):
            console.print(f"{role}: {threads}")
            continue
        for th in threads or []:
            t = Table(title=f"vmigrate {role}, {th['thread']}: share of {th['samples']} samples")
            for col in ("self (function)", "%", "self (line)", "%", "inclusive", "%"):
                t.add_column(col, justify="right" if col == "%" else "left", overflow="fold")
            for a, b, c in zip(th["self"][:10], th["self_lines"][:10], th["inclusive"][:10]):
                t.add_row(a[0], str(a[1]), b[0], str(b[1]), c[0], str(c[1]))
            console.print(t)
