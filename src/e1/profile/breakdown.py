"""The component breakdown: per configuration from an attributed trace (rule parse_trace), and the study's
results/e1_attention_ffn_breakdown.json (rule breakdown). Also the checked readers of what these rules
read and write. No torch import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from e1.jobs.io import ArtifactError, Record, atomic_path, read_parquet, rebuild_hint, write_json
from e1.latency.table import read_summary
from e1.names import GROUPS, STAGES
from e1.profile.trace import attribute, load_events

PROFILE_RULE, PARSE_RULE, BREAKDOWN_RULE = "profile", "parse_trace", "breakdown"

SUM_TOLERANCE = 0.01  # components must add up to the stage's busy time within 1%
CONVENTION = (
    "device time from torch.profiler (CUDA kernels on GPU; top-level ATen ops on CPU), attributed to the "
    "innermost e1 range open when each kernel was launched; decode values are per token (mean over the "
    "profiled decode steps); wall = from the previous stage's last kernel end to this stage's last kernel "
    "end; idle = wall - busy (union of kernel intervals); ms are means over the profiled runs"
)


KERNEL_CONVENTION = (
    "graph replays launch their kernels outside the module ranges, so for cuda_graph variants each LLM kernel is "
    "given the component group that the run's eager profiles attribute most of that kernel name's time to "
    "(learned from every eager configuration of the run); names no eager profile saw are 'unclassified'. "
    "Checked on the eager configurations themselves, each classified from the other eager configurations: "
    "agreement = share of busy time classified into the group its ranges give"
)


def _per_run_mean(df: pd.DataFrame, value: str, runs: int, steps: int) -> float:
    """Mean over all profiled runs (absent = 0) of the per-run total, per decode step for decode, in ms."""
    return float(df[value].sum()) / runs / 1e3 / max(steps, 1)


def config_breakdown(components: pd.DataFrame, stages: pd.DataFrame, profile: dict[str, Any],
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


def read_profile(path: str | Path) -> dict[str, Any]:
    """A profile job's summary JSON, checked."""
    rec = Record.load(path, PROFILE_RULE)
    rec.require("id", "variant", "knobs", "image", "prompt", "decode_tokens", "counts", "meta")
    rec.number("profiled_decode_steps")
    for run in rec.items("profiled_runs"):
        for s in ("vision_encoder", "projector", "prefill"):
            run["stages_ms"].number(s)
        for i in range(len(run["decode_steps_ms"].expect(list))):
            run["decode_steps_ms"].number(i)
    return rec.data


def read_routing(path: str | Path) -> pd.DataFrame:
    """Tokens per expert per layer (Parquet from rule profile), checked."""
    df = read_parquet(path, PROFILE_RULE)
    if list(df.columns) != ["layer", "expert", "tokens"] or df.empty or (df.tokens < 0).any():
        raise ArtifactError(f"{path}: expected columns layer, expert, tokens (tokens >= 0) and at least one row, "
                            f"got {list(df.columns)} with {len(df)} rows; {rebuild_hint(path, PROFILE_RULE)}")
    return df


def parse(trace: str | Path, profile_json: str | Path, routing_parquet: str | Path,
          out_components: str | Path, out_stages: str | Path, out_kernels: str | Path,
          out_json: str | Path) -> dict[str, Any]:
    """Rule parse_trace: attribute one trace, write the three tables and the configuration summary."""
    profile = read_profile(profile_json)
    routing = read_routing(routing_parquet)
    components, stages, kernels, kind = attribute(load_events(trace))
    with atomic_path(out_kernels, suffix=".parquet") as tmp:
        kernels.to_parquet(tmp, index=False)
    if stages.empty:
        raise ArtifactError(f"{trace}: no device activity inside e1 stage ranges; {rebuild_hint(trace, PROFILE_RULE)}")
    with atomic_path(out_components, suffix=".parquet") as tmp:
        components.to_parquet(tmp, index=False)
    with atomic_path(out_stages, suffix=".parquet") as tmp:
        stages.to_parquet(tmp, index=False)
    result = {k: profile[k] for k in ("id", "variant", "knobs", "image", "prompt", "decode_tokens",
                                      "profiled_decode_steps", "counts")}
    result["device_activity"] = "CUDA kernels" if kind == "cuda" else "top-level ATen ops (CPU)"
    result["component_source"] = profile.get("component_source", "profiler ranges")
    result.update(config_breakdown(components, stages, profile, routing))
    runs = profile["profiled_runs"]
    result["profiled_runs_count"] = len(runs)
    result["profiled_event_ms"] = {
        s: sum(r["stages_ms"][s] for r in runs) / len(runs) for s in ("vision_encoder", "projector", "prefill")
    }
    if profile["profiled_decode_steps"]:
        result["profiled_event_ms"]["decode_per_token"] = (
            sum(sum(r["decode_steps_ms"]) for r in runs) / len(runs) / profile["profiled_decode_steps"])
    result["meta"] = profile["meta"]
    write_json(out_json, result)
    return result


def read_config_breakdown(path: str | Path) -> dict[str, Any]:
    """A parse_trace summary JSON, checked."""
    rec = Record.load(path, PARSE_RULE)
    rec.require("id", "variant", "knobs", "image", "prompt", "decode_tokens", "counts", "profiled_event_ms", "meta")
    for name, stage in rec["stages"].data.items():
        for k in ("wall_ms", "busy_ms"):
            rec["stages"][name].number(k)
    return rec.data


def read_kernels(path: str | Path) -> pd.DataFrame:
    """A parse_trace kernel table (stage, component, name, n_kernels, time_us), checked."""
    df = read_parquet(path, PARSE_RULE)
    want = ["stage", "component", "name", "n_kernels", "time_us"]
    if list(df.columns) != want or (df.time_us < 0).any():
        raise ArtifactError(f"{path}: expected columns {want} (time_us >= 0), got {list(df.columns)}; "
                            f"{rebuild_hint(path, PARSE_RULE)}")
    return df


def learn_kernel_groups(tables: list[pd.DataFrame]) -> dict[str, str]:
    """Kernel name -> the component group most of its time belongs to, over range-attributed tables."""
    if not tables:
        return {}
    df = pd.concat(tables)
    df = df.assign(group=df.component.map(lambda c: GROUPS.get(c, "other")))
    by = df.groupby(["name", "group"], as_index=False).time_us.sum()
    return dict(by.sort_values("time_us").groupby("name").group.last())


def classify_kernels(kernels: pd.DataFrame, mapping: dict[str, str]) -> pd.DataFrame:
    """kernels with a `predicted` group per row ('unclassified' for names the mapping lacks)."""
    return kernels.assign(predicted=kernels.name.map(lambda n: mapping.get(n, "unclassified")))


def kernel_agreement(kernels: pd.DataFrame, mapping: dict[str, str]) -> dict[str, float | None]:
    """Per LLM stage: share of kernel time classified into the group its ranges attributed it to."""
    k = classify_kernels(kernels, mapping)
    k = k.assign(group=k.component.map(lambda c: GROUPS.get(c, "other")))
    out = {}
    for stage, g in k.groupby("stage"):
        total = g.time_us.sum()
        out["decode_per_token" if stage == "decode" else stage] = \
            float(g.time_us[g.group == g.predicted].sum() / total) if total else None
    return out


def study_breakdown(summaries: list[str | Path], kernel_tables: list[str | Path], measured: list[str | Path],
                    out: str | Path) -> dict[str, Any]:
    """Rule breakdown: all configurations, profiled-vs-timed stage times (the profiler's overhead), and for
    cuda_graph configurations the component groups classified by kernel name (KERNEL_CONVENTION)."""
    if not summaries:
        raise ValueError("no parse_trace summaries to gather into the component breakdown")
    if len(kernel_tables) != len(summaries):
        raise ValueError(f"{len(summaries)} summaries but {len(kernel_tables)} kernel tables; give one per summary")
    timed = {m["id"]: m for m in map(read_summary, measured)}
    configs, kernels = [], {}
    first = None
    for p, kp in zip(summaries, kernel_tables):
        c = read_config_breakdown(p)
        meta = c.pop("meta")
        first = first or meta
        kernels[c["id"]] = read_kernels(kp)
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
    eager = [c["id"] for c in configs if c.get("component_source", "profiler ranges") == "profiler ranges"]
    for c in configs:
        others = [kernels[i] for i in eager if i != c["id"]]
        if c["id"] in eager:
            c["kernel_name_agreement"] = kernel_agreement(kernels[c["id"]], learn_kernel_groups(others))
            continue
        mapping = learn_kernel_groups(others)
        k = classify_kernels(kernels[c["id"]], mapping)
        runs, steps = c["profiled_runs_count"], c["profiled_decode_steps"]
        for stage, g in k.groupby("stage"):
            key = "decode_per_token" if stage == "decode" else stage
            if key in c["stages"]:
                n = runs * (steps if stage == "decode" else 1)
                c["stages"][key]["groups_ms"] = {grp: float(x.time_us.sum()) / 1e3 / max(n, 1)
                                                 for grp, x in g.groupby("predicted")}
                c["stages"][key]["groups_from"] = f"kernel names learned from {len(others)} eager profiles" \
                    if mapping else "no eager profile in this run: every kernel unclassified"
    agreement = [a for c in configs for a in (c.get("kernel_name_agreement") or {}).values() if a is not None]
    result = {"meta": {k: first[k] for k in ("model", "weights", "device", "device_type", "dtype", "torch",
                                             "transformers")} | {"convention": CONVENTION,
                                                                 "kernel_convention": KERNEL_CONVENTION},
              "kernel_name_agreement": {"min": min(agreement), "median": float(pd.Series(agreement).median()),
                                        "n": len(agreement)} if agreement else None,
              "configs": configs}
    write_json(out, result)
    return result


def read_breakdown(path: str | Path) -> dict[str, Any]:
    """The study's component breakdown JSON, checked (LLM stages carry their component groups)."""
    rec = Record.load(path, BREAKDOWN_RULE)
    rec["meta"].require("model", "device_type", "dtype", "convention")
    for row in rec.items("configs"):
        row.require("id", "variant", "image", "prompt", "decode_tokens", "counts")
        for stage in ("prefill", "decode_per_token"):
            if row["stages"].has(stage):
                st = row["stages"][stage]
                st.number("busy_ms")
                st.number("idle_ms", minimum=None)
                for g in st["groups_ms"].data:
                    st["groups_ms"].number(g)
    return rec.data
