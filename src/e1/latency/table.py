"""The study's stage latency table (rule stage_latency -> results/e1_stage_latency_breakdown.json).

Every configuration's measure summary, checked on the way in, with the run facts that must agree across
configurations, and flags on configurations whose timed runs were noisy or whose host was busy. Also the
checked readers of measure summaries and of the table, for every rule that reads them. No torch import.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from e1.jobs.hostload import BUSY_SHARE, loaded
from e1.jobs.io import ArtifactError, Record, write_json
from e1.names import STAGES

MEASURE_RULE, TABLE_RULE = "measure", "stage_latency"
# Run facts that must agree across configurations: results from different setups never mix silently.
# The sweep knobs differ by design: each configuration row carries its own "variant" and "knobs".
SHARED = ("model", "weights", "token_ids", "seed", "device", "dtype", "torch", "transformers", "protocol")
STAT_KEYS = ("mean_ms", "median_ms", "p95_ms", "p99_ms", "std_ms", "min_ms", "max_ms", "cv")
CV_LIMIT = 0.10  # a configuration whose e2e or stage CV (std / mean over the timed runs) exceeds this is flagged
FLAG_RULE = (f"flagged when the coefficient of variation (std / mean over the timed runs) of e2e or of a stage "
             f"exceeds {CV_LIMIT}, when another process used >= {BUSY_SHARE:.0%} of a CPU core just before or "
             "after the timed runs, when another process was on the GPU, or when NVML saw the GPU's SM clock drop "
             "(busy samples below 0.95 x their max) or a throttle reason during the timed runs")


def _check_stats(rec: Record, lower: float | None = 0.0) -> None:
    for k in STAT_KEYS:
        rec.number(k, minimum=lower if k not in ("std_ms", "cv") else 0.0)
    if rec.number("n", minimum=1) != int(rec.data["n"]):
        raise rec["n"].fail("must be a whole number of runs")


def read_summary(path: str | Path) -> dict[str, Any]:
    """A measure job's summary JSON, checked: every timing a finite number >= 0 (unattributed: any finite)."""
    rec = Record.load(path, MEASURE_RULE)
    for key in ("id", "variant", "image", "prompt"):
        rec[key].expect(str)
    rec["knobs"].expect(dict)
    steps = rec.number("decode_steps")
    rec.number("decode_tokens", minimum=1)
    for key in ("vit_crops", "pooled_features", "inserted_features", "prefill_tokens"):
        rec["counts"].number(key, minimum=1)
    routing = rec["routing"]
    if routing["mode"].expect(str) not in ("learned", "balanced"):
        raise routing["mode"].fail("must be 'learned' or 'balanced'")
    moe = rec.data["routing"].get("prefill") is not None  # a dense LLM has no expert load
    for ph in (("prefill",) + (("decode",) if rec.data["decode_steps"] > 0 else ())) * moe:
        routing[ph]["max_over_mean"].number("mean", minimum=1.0)
        routing[ph]["busiest8_share"].number("mean", minimum=0.0)
        routing[ph]["counts"].expect(list)
    stages = rec["stages"]
    for s in (*STAGES, "e2e", "preprocess"):
        _check_stats(stages[s])
    _check_stats(stages["unattributed"], lower=None)
    if steps > 0:
        _check_stats(rec["decode_step"])
    rec["meta"].require(*SHARED, "device_type", "convention", "env", "build_s")
    return rec.data


def flags(summary: dict[str, Any]) -> list[str]:
    """Why a configuration's timings deserve doubt (empty when they do not); see FLAG_RULE."""
    out = []
    for s in ("e2e", *STAGES):
        cv = summary["stages"][s]["cv"]
        if cv > CV_LIMIT:
            out.append(f"{s} CV {cv:.2f} > {CV_LIMIT}")
    meta = summary["meta"]
    for when, snap in (meta.get("host_load") or {}).items():
        why = loaded(snap)
        if why:
            out.append(f"host busy {when.replace('_', ' ')}: {why}")
    if meta["env"].get("other_gpu_processes"):
        out.append(f"other processes on the GPU: {meta['env']['other_gpu_processes']}")
    gpu = summary.get("gpu_state") or {}
    if gpu.get("clock_dropped"):
        mhz = gpu["busy_sm_clock_mhz"]
        out.append(f"GPU SM clock dropped during the timed runs: {mhz['min']}..{mhz['max']} MHz while busy")
    if gpu.get("throttled"):
        out.append(f"GPU throttle reasons during the timed runs: {', '.join(gpu['throttle_reasons'])} "
                   f"({gpu['throttled_samples']} of {gpu['samples']} samples)")
    return out


OVERHEAD_RULE = ("host overhead of a stage = its eager median - the median of the same configuration with backend "
                 "cuda_graph (same attention, experts, top-k and crops) measured on the same machine (GPU UUID, or "
                 "host name on a CPU); share = overhead / eager median")


def machine(summary: dict[str, Any]) -> str:
    """Which machine measured a summary: its GPU's UUID, else the host name (hosts differ in speed)."""
    env = summary["meta"]["env"]
    return (env.get("gpu_claim") or {}).get("uuid") or env.get("host", "unknown")


def _twin_key(row: dict[str, Any]) -> tuple:
    k = row["knobs"]
    return (row["machine"], row["image"], row["prompt"], row["decode_tokens"],
            *(k[x] for x in sorted(k) if x != "backend"))


def host_overhead(rows: list[dict[str, Any]]) -> None:
    """Give every eager row whose cuda_graph twin was measured its host overhead per stage (OVERHEAD_RULE)."""
    graphs = {_twin_key(r): r for r in rows if r["knobs"].get("backend") == "cuda_graph"}
    for r in rows:
        twin = graphs.get(_twin_key(r)) if r["knobs"].get("backend") == "eager" else None
        if twin is None:
            continue
        ms = {s: r["stages"][s]["median_ms"] - twin["stages"][s]["median_ms"] for s in (*STAGES, "e2e")}
        if r["decode_steps"] > 0:
            ms["decode_step"] = r["decode_step"]["median_ms"] - twin["decode_step"]["median_ms"]
        eager = {**{s: r["stages"][s]["median_ms"] for s in ms if s != "decode_step"},
                 **({"decode_step": r["decode_step"]["median_ms"]} if "decode_step" in ms else {})}
        r["host_overhead"] = {"graph_twin": twin["id"], "ms": ms,
                              "share": {s: v / eager[s] if eager[s] > 0 else None for s, v in ms.items()}}


def job_cost(configs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the run's measure jobs cost outside their warm-up and timed runs, and the gaps between them."""
    times = [c["meta"]["job_time"] for c in configs if c["meta"].get("job_time")]
    if not times:
        return None
    outside = sorted(t["outside_runs_s"] for t in times)
    spans = sorted((t["marks"].get("shell_start", t["marks"]["python_start"]), t["marks"]["end"]) for t in times)
    gaps = [b[0] - a[1] for a, b in zip(spans, spans[1:]) if b[0] >= a[1]]

    def stats(v: list[float]) -> dict[str, float] | None:
        return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)} if v else None

    steps: dict[str, list[float]] = {}
    for t in times:
        for k, v in t["steps_s"].items():
            steps.setdefault(k, []).append(v)
    return {"outside_runs_s": stats(outside), "runs_s_total": sum(t["runs_s"] for t in times),
            "jobs_s_total": sum(t["total_s"] for t in times), "gap_between_jobs_s": stats(gaps),
            "first_start_to_last_end_s": spans[-1][1] - spans[0][0],
            "median_step_s": {k: statistics.median(v) for k, v in steps.items()}}


def read_same_setup(summaries: list[str | Path], keys: tuple[str, ...], table: str) -> list[dict[str, Any]]:
    """Measure summaries (read_summary) whose meta agree on `keys`; a mix is an error naming the two files."""
    if not summaries:
        raise ValueError(f"no measure summaries to put in {table}")
    configs = [read_summary(p) for p in summaries]
    first = configs[0]["meta"]
    for path, c in zip(summaries, configs):
        diff = {k: (first.get(k), c["meta"].get(k)) for k in keys if c["meta"].get(k) != first.get(k)}
        if diff:
            raise ArtifactError(f"{path} ({c['id']}) was measured under a different setup than {summaries[0]} "
                                f"({configs[0]['id']}): {diff}; refusing to mix them in {table}. Rebuild the "
                                f"stale one: `snakemake --forcerun {MEASURE_RULE}`")
    return configs


def stage_latency(summaries: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Rule stage_latency: all configurations of one run in one table."""
    configs = read_same_setup(summaries, SHARED, "the stage latency table")
    first = configs[0]["meta"]
    meta = {k: first[k] for k in (*SHARED, "device_type", "convention")}
    meta["env"] = first["env"]
    meta["weights_loaded"] = first.get("weights_loaded")
    meta["build_s"] = [c["meta"]["build_s"] for c in configs]
    meta["tokens_identical_across_runs"] = all(c["tokens_identical_across_runs"] for c in configs)
    meta["flag_rule"] = FLAG_RULE
    rows = []
    for c in configs:
        row = {k: v for k, v in c.items() if k != "meta"}
        row["flags"] = flags(c)
        row["machine"] = machine(c)
        row["host_load"] = c["meta"].get("host_load")
        rows.append(row)
    meta["flagged"] = {r["id"]: r["flags"] for r in rows if r["flags"]}
    host_overhead(rows)
    meta["host_overhead_rule"] = OVERHEAD_RULE
    meta["job_cost"] = job_cost(configs)
    for r, c in zip(rows, configs):
        r["host_bench"] = c["meta"].get("host_bench")
        r["job_time"] = c["meta"].get("job_time")
    result = {"meta": meta, "configs": rows}
    write_json(out, result)
    return result


def read_latency(path: str | Path) -> dict[str, Any]:
    """The stage latency table, checked: at least one configuration, every stage median finite and >= 0."""
    rec = Record.load(path, TABLE_RULE)
    rec["meta"].require("model", "device", "device_type", "dtype", "weights", "protocol", "convention")
    for row in rec.items("configs"):
        for key in ("id", "variant", "image", "prompt"):
            row[key].expect(str)
        row.number("decode_tokens", minimum=1)
        row.number("decode_steps")
        row["knobs"].expect(dict)
        row["counts"].number("prefill_tokens", minimum=1)
        row["counts"].number("vit_crops", minimum=1)
        for s in (*STAGES, "e2e"):
            row["stages"][s].number("median_ms")
            row["stages"][s].number("mean_ms")
        if row.data["decode_steps"] > 0:
            row["decode_step"].number("median_ms")
    return rec.data


def read_fidelity(path: str | Path) -> dict[str, Any]:
    """A fidelity job's JSON (e1 against generate()), checked."""
    rec = Record.load(path, "fidelity")
    rec.require("id", "decode_tokens", "tokens_equal", "within_target", "experts_used")
    for k in ("e1_median_ms", "generate_median_ms", "ratio_e1_over_generate"):
        rec.number(k, minimum=1e-12)
    return rec.data


def routing_pairs(configs: list[dict]) -> list[tuple[dict, dict]]:
    """(learned, balanced) configurations that differ only in moe_routing (the last part of the variant name)."""
    by_key: dict[str, dict[str, dict]] = {}
    for c in configs:
        by_key.setdefault(c["id"].rsplit(".", 1)[0], {})[c["knobs"].get("moe_routing", "learned")] = c
    return [(m["learned"], m["balanced"]) for m in by_key.values() if {"learned", "balanced"} <= m.keys()]
