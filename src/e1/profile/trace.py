"""Attribute device time in a Kineto trace to (run, stage, step, component, layer).

Device activities are GPU kernels/memcpys/memsets in a CUDA trace; in a CPU-only trace they are the
top-level ATen ops of the thread that holds our ranges. A kernel belongs to the innermost e1 ranges
open on the launching thread when its launch (matched by correlation id) ran; an op, to those open
when it started. Ranges come from e1.profile.ranges / e1.latency.timing (e1.run:, e1.stage:, e1.comp:).

Stage wall time on the device timeline follows the CUDA-event convention: from the end of the
previous stage's last activity (the first stage of a run: its first activity) to the end of its own
last activity. Busy = union of activity intervals; idle = wall - busy.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from e1.jobs.io import ArtifactError, rebuild_hint
from e1.names import COMP_RANGE as COMP
from e1.names import RUN_RANGE as RUN
from e1.names import STAGE_RANGE as STAGE

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
_COMP_RE = re.compile(r"^(?P<name>[^@]+)(?:@(?P<layer>\d+))?$")


@dataclass
class _Act:
    t_launch: float
    tid: object
    start: float
    dur: float
    name: str = ""
    run: int = -1
    stage: str = "none"
    step: int = -1
    component: str = "other"
    layer: int = -1


def load_events(path: str | Path) -> list[dict]:
    """The events of a Kineto trace (.json or .json.gz); unreadable or truncated traces name the file."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rt") as f:
            events = json.load(f)["traceEvents"]
    except (OSError, EOFError, ValueError, KeyError, TypeError) as e:  # gzip, JSON and shape errors
        raise ArtifactError(f"{path}: not a readable Kineto trace ({type(e).__name__}: {e}); "
                            f"{rebuild_hint(path, 'profile')}") from None
    if not isinstance(events, list):
        raise ArtifactError(f"{path}: traceEvents is not a list; {rebuild_hint(path, 'profile')}")
    return events


def _activities(events: list[dict], range_tids: set) -> tuple[list[_Act], str]:
    kernels = [e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    if kernels:
        launches = {e["args"]["correlation"]: e for e in events
                    if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
        acts = []
        for k in kernels:
            launch = launches.get(k.get("args", {}).get("correlation"))
            t, tid = (launch["ts"], launch["tid"]) if launch else (float("nan"), None)
            acts.append(_Act(t, tid, float(k["ts"]), float(k.get("dur", 0.0)), str(k.get("name", ""))))
        return acts, "cuda"
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op" and e.get("tid") in range_tids),
                 key=lambda e: (e["tid"], e["ts"], -e.get("dur", 0.0)))
    acts, end, tid = [], float("-inf"), None
    for e in ops:  # keep top-level ops: those not inside the previous top-level op of the same thread
        if e["tid"] != tid:
            tid, end = e["tid"], float("-inf")
        if e["ts"] >= end:
            acts.append(_Act(float(e["ts"]), e["tid"], float(e["ts"]), float(e.get("dur", 0.0)), str(e.get("name", ""))))
            end = e["ts"] + e.get("dur", 0.0)
    return acts, "cpu"


def _assign(acts: list[_Act], ranges: list[dict]) -> None:
    """Sweep each thread's timeline: a stack of open (nested) ranges gives each activity its context."""
    by_tid: dict[object, list] = {}
    for r in ranges:
        by_tid.setdefault(r["tid"], []).append((float(r["ts"]), 0, float(r["ts"]) + float(r.get("dur", 0.0)), r["name"]))
    for a in acts:
        if a.tid in by_tid:
            by_tid[a.tid].append((a.t_launch, 1, a.t_launch, a))
    for items in by_tid.values():
        items.sort(key=lambda x: (x[0], x[1], -x[2]))
        stack: list[tuple[float, str]] = []
        for t, kind, end, obj in items:
            # a range closed at t is still open for a launch at t, but not for a range starting at t
            while stack and (stack[-1][0] < t or (kind == 0 and stack[-1][0] <= t)):
                stack.pop()
            if kind == 0:
                stack.append((end, obj))
                continue
            for _, name in reversed(stack):  # innermost first
                if name.startswith(COMP) and obj.component == "other":
                    m = _COMP_RE.match(name[len(COMP):])
                    obj.component, obj.layer = m["name"], int(m["layer"] or -1)
                elif name.startswith(STAGE) and obj.stage == "none":
                    stage, _, step = name[len(STAGE):].partition("#")
                    obj.stage, obj.step = stage, int(step or -1)
                elif name.startswith(RUN) and obj.run < 0:
                    obj.run = int(name[len(RUN):])


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (cur_e - cur_s if cur_e is not None else 0.0)


def attribute(events: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, str]:
    """-> (components, stages, kernels, device kind).

    components: run, stage, step, component, layer, n_kernels, time_us (sum of activity durations)
    stages: run, stage, step, wall_us, busy_us, kernel_us, n_kernels  (one row per stage instance)
    kernels: stage, component, name, n_kernels, time_us (summed over runs and steps; LLM stages only)
    Activities outside every stage range get stage "none" (reported, never dropped).
    """
    ranges = [e for e in events if e.get("ph") == "X" and e.get("cat") == "user_annotation"
              and str(e.get("name", "")).startswith("e1.")]
    acts, kind = _activities(events, {r["tid"] for r in ranges})
    _assign(acts, ranges)
    df = pd.DataFrame([(a.run, a.stage, a.step, a.component, a.layer, a.start, a.dur, a.name) for a in acts],
                      columns=["run", "stage", "step", "component", "layer", "start", "dur", "name"])
    comp = (df.groupby(["run", "stage", "step", "component", "layer"], as_index=False)
            .agg(n_kernels=("dur", "size"), time_us=("dur", "sum")))
    rows = []
    staged = df[df.stage != "none"]
    for run, g in staged.groupby("run"):
        inst = g.groupby(["stage", "step"])
        order = sorted(((s["start"] + s["dur"]).max(), stage, step) for (stage, step), s in inst)
        prev_end = None
        for last_end, stage, step in order:
            s = inst.get_group((stage, step))
            begin = s["start"].min() if prev_end is None else prev_end
            rows.append((run, stage, step, last_end - begin, _union(list(zip(s["start"], s["start"] + s["dur"]))),
                         s["dur"].sum(), len(s)))
            prev_end = last_end
    stages = pd.DataFrame(rows, columns=["run", "stage", "step", "wall_us", "busy_us", "kernel_us", "n_kernels"])
    kernels = (df[df.stage.isin(["prefill", "decode"])].groupby(["stage", "component", "name"], as_index=False)
               .agg(n_kernels=("dur", "size"), time_us=("dur", "sum")))
    return comp, stages, kernels, kind
