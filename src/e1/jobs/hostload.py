"""How busy the host is around a job's timed runs: load average and the other processes using the CPU.

Read from /proc (Linux) over a short window; elsewhere only the load average. No torch import.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

WINDOW_S = 0.2  # CPU time of every other process is sampled over this window
BUSY_SHARE = 0.25  # a process using at least this share of one core in the window is "busy"


def _cpu_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (name, user + system clock ticks so far) for every process we may read."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1: text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(d.name)] = (name, int(fields[11]) + int(fields[12]))  # utime, stime
    return out


def _procs_running() -> int | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("procs_running"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def ancestors() -> set[int]:
    """This process's parents up to init: the job's shell and the snakemake that started it."""
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def snapshot(window_s: float = WINDOW_S, exclude: set[int] | None = None) -> dict[str, Any]:
    """Load average, running-process count, and processes (other than this one, its ancestors - the workflow
    that runs it, reported apart - and `exclude`) that used at least BUSY_SHARE of a core during `window_s`."""
    parents = ancestors() if Path("/proc/stat").exists() else set()
    skip = {os.getpid(), *parents, *(exclude or set())}
    snap: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()], "cpu_count": os.cpu_count(),
                            "window_s": window_s}
    if not Path("/proc/stat").exists():
        snap["busy_processes"] = None  # not measurable here
        return snap
    hz = os.sysconf("SC_CLK_TCK")
    t0, before = time.monotonic(), _cpu_ticks()
    time.sleep(window_s)
    t1, after = time.monotonic(), _cpu_ticks()
    busy, own = [], []
    for pid, (name, ticks) in after.items():
        if pid not in before or pid == os.getpid():
            continue
        share = (ticks - before[pid][1]) / hz / (t1 - t0)
        if pid in parents:
            own.append({"pid": pid, "name": name, "cpu_share": round(share, 2)})
        elif pid not in skip and share >= BUSY_SHARE:
            busy.append({"pid": pid, "name": name, "cpu_share": round(share, 2)})
    snap["procs_running"] = _procs_running()
    snap["busy_processes"] = sorted(busy, key=lambda p: -p["cpu_share"])
    snap["workflow_processes"] = own  # the job's own shell and snakemake (seen on the H200: snakemake ~30-45 %)
    return snap


def loaded(snap: dict[str, Any] | None) -> str | None:
    """Why a snapshot shows a loaded host (None when it does not, or was not measured)."""
    if not snap or not snap.get("busy_processes"):
        return None
    top = snap["busy_processes"][:3]
    return "other processes used the CPU: " + ", ".join(
        f"pid {p['pid']} ({p['name']}) {100 * p['cpu_share']:.0f} % of a core" for p in top)
