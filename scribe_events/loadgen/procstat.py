"""CPU and memory of processes from ``/proc`` (Linux), and which process listens on a port.

Everything here gives up quietly (``None``) where ``/proc`` is missing or another user's process is
not visible: a benchmark without server figures is still a benchmark.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of a process: CPU seconds so far (user + system) and resident memory."""

    pid: int
    cpu_s: float
    rss_kib: int


def sample(pid: int) -> Sample | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
    except (IndexError, ValueError):
        return None
    rss = 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break
    return Sample(pid, ticks / CLK_TCK, rss)


def usage(before: Sample | None, after: Sample | None, wall_s: float) -> dict[str, object] | None:
    """CPU % over ``wall_s`` and RSS at both ends, as the reports show them."""
    if before is None:
        return None
    cpu_s = (after.cpu_s - before.cpu_s) if after is not None else 0.0
    return {
        "pid": before.pid,
        "cpu_pct": round(100 * cpu_s / wall_s, 1) if wall_s > 0 else 0.0,
        "cpu_s": round(cpu_s, 2),
        "rss_mib_start": round(before.rss_kib / 1024, 1),
        "rss_mib_end": round(after.rss_kib / 1024, 1) if after is not None else None,
        "alive": after is not None,
    }


def own_cpu_s() -> float:
    """CPU seconds of this process so far (user + system)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile() -> int:
    """Lift the soft limit on open files to the hard one (a benchmark holds many sockets); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def listener_pid(port: int) -> int | None:
    """The process with a socket listening on ``port`` (any address), if this user can see it."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN; the inode is column 9.
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    if not inodes:
        return None
    try:
        pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    except OSError:
        return None
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return pid
            except OSError:
                continue
    return None
