"""Per-configuration component breakdown from an attributed trace, and the study's breakdown JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from e1.names import GROUPS, STAGES
from e1.trace import attribute, load_events

SUM_TOLERANCE = 0.01  # components must add up to the stage's busy time within 1%
CONVENTION = (
    "device time from torch.profiler (CUDA kernels on GPU; top-level ATen ops on CPU), attributed to the "
    "innermost e1 range open when each kernel was launched; decode values are per token (mean over the "
    "profiled decode steps); wall = from the previous stage's last kernel end to this stage's last kernel "
    "end; idle = wall - busy (union of kernel intervals); ms are means over the profiled runs"
)


def _per_run_mean(df: pd.DataFrame, value: str, runs: int, steps: int) -> float:
    """Mean over all profiled runs (absent = 0) of the per-run total, per decode step for decode, in ms."""
    return float(df[value].sum()) / runs / 1e3 / max(steps, 1)


def summarize(components: pd.DataFrame, stages: pd.DataFrame, profile: dict[str, Any],
              routing: pd.DataFrame) -> dict[str, Any]:
    """One configuration: per stage wall/busy/idle, components and groups, sum check, routing balance."""
    steps = profile["profiled_decode_steps"]
    runs = len(profile["profiled_runs"])
    out: dict[str, Any] = {}
    for stage in STAGES:
        n = steps if stage == "decode" else 1
        if stage == "decode" and steps == 0:
            continue
        st, cp = stages[stages.stage == stage], components[components.stage == stage]
        comp_ms = {name: _per_run_mean(g, "time_us", runs, n) for name, g in cp.groupby("component")}
        busy, kernel = _per_run_mean(st, "busy_us", runs, n), _per_run_mean(st, "kernel_us", runs, n)
        wall = _per_run_mean(st, "wall_us", runs, n)
        entry = {
            "wall_ms": wall, "busy_ms": busy, "idle_ms": wall - busy, "idle_share": (wall - busy) / wall if wall else 0.0,
            "kernels": int(st["n_kernels"].sum() / runs / n),
            "kernel_ms": kernel,
            "components_ms": dict(sorted(comp_ms.items(), key=lambda kv: -kv[1])),
            "sum_check": {"components_ms": sum(comp_ms.values()), "busy_ms": busy,
                          "relative_error": abs(sum(comp_ms.values()) - busy) / busy if busy else 0.0},
        }
        entry["sum_check"]["holds"] = entry["sum_check"]["relative_error"] <= SUM_TOLERANCE
        if stage in ("prefill", "decode"):
            groups: dict[str, float] = {}
            for name, ms in comp_ms.items():
                groups[GROUPS.get(name, "other")] = groups.get(GROUPS.get(name, "other"), 0.0) + ms
            entry["groups_ms"] = groups
        out["decode_per_token" if stage == "decode" else stage] = entry
    none = components[components.stage == "none"]
    per_layer = routing.groupby("layer")["tokens"].agg(["max", "mean"])
    imbalance = (per_layer["max"] / per_layer["mean"]).tolist()
    return {
        "stages": out,
        "unattributed_kernels": {"count": int(none["n_kernels"].sum()), "time_ms": float(none["time_us"].sum() / 1e3)},
        "routing": {"imbalance_max_over_mean_by_layer": imbalance,
                    "imbalance_mean": sum(imbalance) / len(imbalance) if imbalance else None,
                    "experts_unused_by_layer": routing.groupby("layer")["tokens"].apply(lambda t: int((t == 0).sum())).tolist()},
    }


def parse(trace: str | Path, profile_json: str | Path, routing_parquet: str | Path,
          out_components: str | Path, out_stages: str | Path, out_json: str | Path) -> dict[str, Any]:
    """Rule parse_trace: attribute one trace, write the two tables and the configuration summary."""
    profile = json.loads(Path(profile_json).read_text())
    components, stages, kind = attribute(load_events(trace))
    components.to_parquet(out_components, index=False)
    stages.to_parquet(out_stages, index=False)
    result = {k: profile[k] for k in ("id", "variant", "knobs", "image", "prompt", "decode_tokens",
                                      "profiled_decode_steps", "counts")}
    result["device_activity"] = "CUDA kernels" if kind == "cuda" else "top-level ATen ops (CPU)"
    result.update(summarize(components, stages, profile, pd.read_parquet(routing_parquet)))
    runs = profile["profiled_runs"]
    result["profiled_event_ms"] = {
        s: sum(r["stages_ms"][s] for r in runs) / len(runs) for s in ("vision_encoder", "projector", "prefill")
    }
    if profile["profiled_decode_steps"]:
        result["profiled_event_ms"]["decode_per_token"] = (
            sum(sum(r["decode_steps_ms"]) for r in runs) / len(runs) / profile["profiled_decode_steps"])
    result["meta"] = profile["meta"]
    Path(out_json).write_text(json.dumps(result, indent=1) + "\n")
    return result


def aggregate(summaries: list[str | Path], measured: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Rule breakdown: all configurations + profiled-vs-timed stage times (the profiler's overhead)."""
    timed = {}
    for p in measured:
        m = json.loads(Path(p).read_text())
        timed[m["id"]] = m
    configs = []
    for p in summaries:
        c = json.loads(Path(p).read_text())
        c.pop("meta")
        t = timed.get(c["id"])
        if t is not None:
            ref = {s: t["stages"][s]["median_ms"] for s in ("vision_encoder", "projector", "prefill")}
            if t.get("decode_step"):
                ref["decode_per_token"] = t["decode_step"]["median_ms"]
            c["profiled_over_timed"] = {k: c["profiled_event_ms"][k] / v for k, v in ref.items()
                                        if k in c["profiled_event_ms"] and v > 0}
            # the profiler slows the host, not the kernels: idle against the un-profiled timed wall
            for k, v in ref.items():
                if k in c["stages"] and v > 0:
                    c["stages"][k]["timed_wall_ms"] = v
                    c["stages"][k]["idle_share_timed"] = max(0.0, 1 - c["stages"][k]["busy_ms"] / v)
        configs.append(c)
    first = json.loads(Path(summaries[0]).read_text())["meta"]
    result = {"meta": {k: first[k] for k in ("model", "weights", "device", "device_type", "dtype", "torch",
                                             "transformers")} | {"convention": CONVENTION},
              "configs": configs}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result
