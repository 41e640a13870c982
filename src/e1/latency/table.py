"""The study's stage latency table (rule stage_latency -> results/e1_stage_latency_breakdown.json).

Every configuration's measure summary, checked on the way in, with the run facts that must agree across
configurations, and flags on configurations whose timed runs were noisy or whose host was busy. Also the
checked readers of measure summaries and of the table, for every rule that reads them. No torch import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e1.jobs.hostload import BUSY_SHARE, loaded
from e1.jobs.io import ArtifactError, Record, write_json
from e1.names import STAGES

MEASURE_RULE, TABLE_RULE = "measure", "stage_latency"
# Run facts that must agree across configurations: results from different setups never mix silently.
# The sweep knobs differ by design: each configuration row carries its own "variant" and "knobs".
SHARED = ("model", "weights", "seed", "device", "dtype", "torch", "transformers", "protocol")
STAT_KEYS = ("mean_ms", "median_ms", "p95_ms", "p99_ms", "std_ms", "min_ms", "max_ms", "cv")
CV_LIMIT = 0.10  # a configuration whose e2e or stage CV (std / mean over the timed runs) exceeds this is flagged
FLAG_RULE = (f"flagged when the coefficient of variation (std / mean over the timed runs) of e2e or of a stage "
             f"exceeds {CV_LIMIT}, when another process used >= {BUSY_SHARE:.0%} of a CPU core just before or "
             "after the timed runs, or when another process was on the GPU")


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
    return out


def stage_latency(summaries: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Rule stage_latency: all configurations of one run in one table."""
    if not summaries:
        raise ValueError("no measure summaries to put in the stage latency table")
    configs = [read_summary(p) for p in summaries]
    first = configs[0]["meta"]
    for path, c in zip(summaries, configs):
        diff = {k: (first.get(k), c["meta"].get(k)) for k in SHARED if c["meta"].get(k) != first.get(k)}
        if diff:
            raise ArtifactError(f"{path} ({c['id']}) was measured under a different setup than {summaries[0]} "
                                f"({configs[0]['id']}): {diff}; refusing to mix them in one table. Rebuild the "
                                f"stale one: `snakemake --forcerun {MEASURE_RULE}`")
    meta = {k: first[k] for k in (*SHARED, "device_type", "convention")}
    meta["env"] = first["env"]
    meta["build_s"] = [c["meta"]["build_s"] for c in configs]
    meta["tokens_identical_across_runs"] = all(c["tokens_identical_across_runs"] for c in configs)
    meta["flag_rule"] = FLAG_RULE
    rows = []
    for c in configs:
        row = {k: v for k, v in c.items() if k != "meta"}
        row["flags"] = flags(c)
        row["host_load"] = c["meta"].get("host_load")
        rows.append(row)
    meta["flagged"] = {r["id"]: r["flags"] for r in rows if r["flags"]}
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
