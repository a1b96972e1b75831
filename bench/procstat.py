"""CPU time, context switches and resident memory of processes, read from /proc (Linux only).

CPU is `utime + stime` (fields 14 and 15 of /proc/<pid>/stat) in clock ticks, converted to
milliseconds; a process that has gone away counts as 0 from then on, so a delta never fails.
Context switches are summed over a process's threads (/proc/<pid>/task/*/status): a voluntary
one is a sleep (each ends in a wakeup), an involuntary one a preemption.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from shared.settings import BrokerSettings

TICK_MS = 1000.0 / os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def cpu_ms(pid: int) -> float:
    """User + system CPU time of `pid` so far, in ms (0 if it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of `pid`'s live threads so far; (0, 0) if gone."""
    voluntary = involuntary = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0, 0
    for task in tasks:
        try:
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def switches_snapshot(pids: Iterable[int]) -> dict[int, tuple[int, int]]:
    return {pid: switches(pid) for pid in pids}


def switches_delta(before: dict[int, tuple[int, int]]) -> dict[int, tuple[int, int]]:
    """Context switches each pid of `before` made since; never negative (a thread that ended
    takes its count with it)."""
    out = {}
    for pid, (voluntary, involuntary) in before.items():
        now_voluntary, now_involuntary = switches(pid)
        out[pid] = (max(now_voluntary - voluntary, 0), max(now_involuntary - involuntary, 0))
    return out


def rss_mb(pid: int) -> float:
    """Resident set size of `pid` in MiB (0 if it is gone)."""
    try:
        pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * PAGE / 2**20


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (workers of a multi-process server)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(raw[raw.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found.extend(kids)
        todo.extend(kids)
    return found


def with_children(pids: Iterable[int]) -> list[int]:
    out: list[int] = []
    for pid in pids:
        out.append(pid)
        out.extend(children(pid))
    return out


def cpu_snapshot(pids: Iterable[int]) -> dict[int, float]:
    return {pid: cpu_ms(pid) for pid in pids}


def cpu_delta(before: dict[int, float]) -> dict[int, float]:
    """CPU ms each pid of `before` used since; never negative."""
    return {pid: max(cpu_ms(pid) - ms, 0.0) for pid, ms in before.items()}


def listener_pid(port: int) -> int | None:
    """The process listening on TCP `port` (IPv4 or IPv6), read from /proc; None if none is
    found or its sockets cannot be seen (another user's, without root)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local address "ADDR:PORT" in hex, state 0A = LISTEN, inode in field 10
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    wanted = {f"socket:[{inode}]" for inode in inodes if inode != "0"}
    if not wanted:
        return None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                if os.readlink(fd) in wanted:
                    return int(entry.name)
        except OSError:  # gone, or not ours to look into
            continue
    return None


def rabbitmq_pid(url: str | None = None) -> int | None:
    """The broker's Erlang VM: the process listening on the port of `url` (by default the
    services' own `RABBITMQ_URL`, so a run against another node measures that node), else the
    OS pid `rabbitmqctl status` gives, else `pgrep beam.smp` when it finds exactly one."""
    port = urlsplit(url or BrokerSettings().rabbitmq_url).port or 5672
    found = listener_pid(port)
    if found is not None:
        return found
    if shutil.which("rabbitmqctl"):
        try:
            out = subprocess.run(
                ["rabbitmqctl", "status"], capture_output=True, text=True, timeout=20, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        for line in out.splitlines():
            if line.strip().startswith("OS PID:"):
                return int(line.split(":", 1)[1])
    try:
        out = subprocess.run(
            ["pgrep", "-f", "beam.smp"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    pids = [int(p) for p in out.split()]
    return pids[0] if len(pids) == 1 else None
