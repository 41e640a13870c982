"""FLOPs and bytes against measured latency, per (configuration, stage), with a measured roofline.

For every configuration of the stage latency breakdown and every stage (vision encoder, projector,
prefill, decode = all N-1 steps, summed over the growing context; per step too): analytic FLOPs (e1.flops)
and bytes (e1.traffic, in the run's dtype), the measured median latency, the roofline time
max(FLOPs / peak, bytes / bandwidth) with peak and bandwidth measured by e1.calibrate, and the efficiency
roofline / measured. Rows with sweep knobs use the architecture with those knobs (Arch.with_knobs).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from e1 import flops, traffic
from e1.arch import Arch, load_arch
from e1.correlation import loglog_fit, spearman
from e1.names import STAGES

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Knobs that change the work (FLOPs/bytes) versus knobs that only change how the same work is executed.
WORK_KNOBS = ("moe_top_k", "max_crops")
IMPL_KNOBS = ("attn_implementation", "experts_implementation", "decode_backend")
CONVENTION = (
    "one point per (configuration, stage); flops: e1.flops (2 per multiply-add, matrix products only); bytes: "
    "e1.traffic (minimum device-memory traffic in the run's dtype); decode = all N-1 decode steps, FLOPs and "
    "bytes summed over the steps with growing context (per_step: the mean step, measured per-step median); "
    "measured_ms: median of the timed runs; roofline_ms = max(flops / matmul peak, bytes / copy bandwidth), "
    "both measured by e1.calibrate (copy bandwidth counts read + write); efficiency = roofline_ms / measured_ms; "
    "fits: least squares of log10(measured_ms) on log10(x) over all points, R^2, and Spearman's rho (ties "
    "averaged)"
)


def knobs_of(row: dict[str, Any], meta: dict[str, Any], arch: Arch) -> dict[str, Any]:
    """A row's knobs; rows without a "knobs" dict (before the sweep axes) ran with the run's settings (meta)
    and the shipped arch."""
    k = row.get("knobs") or {}
    return {
        "attn_implementation": k.get("attn_implementation", meta.get("attn_implementation", "sdpa")),
        "experts_implementation": k.get("experts_implementation", meta.get("experts_implementation", "grouped_mm")),
        "decode_backend": k.get("decode_backend", "eager"),
        "moe_top_k": k.get("moe_top_k", arch.llm["top_k"]),
        "max_crops": k.get("max_crops", arch.preprocess["max_crops"]),
    }


def roofline_ms(f: float, b: float, cal: dict[str, Any]) -> tuple[float, str]:
    """Roofline time (ms) of f FLOPs and b bytes, and which ceiling binds ('compute' or 'memory')."""
    compute, memory = f / (cal["matmul_tflops"] * 1e12), b / (cal["copy_gbps"] * 1e9)
    return 1e3 * max(compute, memory), "compute" if compute >= memory else "memory"


def stage_costs(arch: Arch, counts: dict[str, Any], decode_steps: int, dtype_bytes: int) -> dict[str, dict]:
    """Analytic FLOPs and bytes per stage; decode summed over its steps (context grows by one per step)."""
    f = flops.stage_flops(arch, counts)
    b = traffic.stage_bytes(arch, counts, dtype_bytes)
    costs = {s: {"flops": f[s]["total"], "bytes": b[s]["total"]} for s in STAGES[:3]}
    t = counts["prefill_tokens"]
    step_f = [sum(flops.decode_step(arch, t + i).values()) for i in range(decode_steps)]
    step_b = [sum(traffic.decode_step(arch, t + i, dtype_bytes).values()) for i in range(decode_steps)]
    costs["decode"] = {"flops": sum(step_f), "bytes": sum(step_b)}
    return costs


def points_of(row: dict[str, Any], meta: dict[str, Any], cal: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per stage of one configuration (decode only when it has steps)."""
    base = load_arch(meta["model"])
    knobs = knobs_of(row, meta, base)
    arch = base.with_knobs(moe_top_k=knobs["moe_top_k"], max_crops=knobs["max_crops"])
    if meta["dtype"] not in DTYPE_BYTES:
        raise ValueError(f"dtype {meta['dtype']!r}; allowed: {', '.join(DTYPE_BYTES)}")
    steps = int(row["decode_steps"])
    costs = stage_costs(arch, row["counts"], steps, DTYPE_BYTES[meta["dtype"]])
    out = []
    for s in STAGES:
        if s == "decode" and steps == 0:
            continue
        f, b = costs[s]["flops"], costs[s]["bytes"]
        ms = row["stages"][s]["median_ms"]
        roof, bound = roofline_ms(f, b, cal)
        p = {"id": row["id"], "variant": row.get("variant"), "image": row["image"], "prompt": row["prompt"],
             "decode_tokens": row["decode_tokens"], "prefill_tokens": row["counts"]["prefill_tokens"], "stage": s,
             "knobs": knobs, "flops": f, "bytes": b, "flops_per_byte": f / b, "measured_ms": ms,
             "roofline_ms": roof, "bound": bound, "efficiency": roof / ms if ms > 0 else None}
        if s == "decode":
            step_roof, step_bound = roofline_ms(f / steps, b / steps, cal)
            step_ms = row["decode_step"]["median_ms"]
            p["per_step"] = {"steps": steps, "flops_mean": f / steps, "bytes_mean": b / steps,
                             "measured_median_ms": step_ms, "roofline_ms": step_roof, "bound": step_bound,
                             "efficiency": step_roof / step_ms if step_ms > 0 else None}
        out.append(p)
    return out


def inversions(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stage pairs of one configuration where the stage with more FLOPs took less time, largest mismatch first."""
    by_config: dict[str, list[dict]] = {}
    for p in points:
        by_config.setdefault(p["id"], []).append(p)
    found = []
    for cid, ps in by_config.items():
        for a in ps:
            for b in ps:
                if a["flops"] > b["flops"] and a["measured_ms"] < b["measured_ms"]:
                    found.append({"id": cid, "more_flops": a["stage"], "less_flops": b["stage"],
                                  "flops_ratio": a["flops"] / b["flops"],
                                  "latency_ratio": b["measured_ms"] / a["measured_ms"],
                                  "more_flops_ms": a["measured_ms"], "less_flops_ms": b["measured_ms"],
                                  "more_flops_gflop": a["flops"] / 1e9, "less_flops_gflop": b["flops"] / 1e9})
    return sorted(found, key=lambda x: -x["flops_ratio"] * x["latency_ratio"])


def equal_flops_spread(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, latency spread over rows with equal work (same image, prompt, N, top-k, max_crops) that
    differ only in how it is executed (attention/experts implementation, decode backend)."""
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        key = (p["image"], p["prompt"], p["decode_tokens"], *(p["knobs"][k] for k in WORK_KNOBS), p["stage"])
        groups.setdefault(key, []).append(p)
    spread = []
    for (image, prompt, n, top_k, max_crops, stage), ps in groups.items():
        impls = {tuple(p["knobs"][k] for k in IMPL_KNOBS) for p in ps}
        if len(impls) < 2:
            continue
        ms = [p["measured_ms"] for p in ps]
        fastest, slowest = min(ps, key=lambda p: p["measured_ms"]), max(ps, key=lambda p: p["measured_ms"])
        spread.append({"image": image, "prompt": prompt, "decode_tokens": n, "moe_top_k": top_k,
                       "max_crops": max_crops, "stage": stage, "flops": ps[0]["flops"], "n_rows": len(ps),
                       "min_ms": min(ms), "max_ms": max(ms), "ratio": max(ms) / min(ms) if min(ms) > 0 else None,
                       "fastest": {k: fastest["knobs"][k] for k in IMPL_KNOBS},
                       "slowest": {k: slowest["knobs"][k] for k in IMPL_KNOBS}})
    return spread


def decode_roofline(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Measured ms per decode token next to its floor, the per-step roofline time (decode is memory-bound:
    analytic bytes per step -- active weights, KV cache, activations -- / measured copy bandwidth)."""
    rows = [{"id": p["id"], "variant": p["variant"], "knobs": p["knobs"], "ms_per_token": s["measured_median_ms"],
             "floor_ms": s["roofline_ms"], "bound": s["bound"], "times_floor": s["measured_median_ms"] / s["roofline_ms"]}
            for p in points if p["stage"] == "decode" and (s := p.get("per_step"))]
    return sorted(rows, key=lambda r: (r["variant"] or "", r["id"]))


def fits(points: list[dict[str, Any]]) -> dict[str, Any]:
    """How well FLOPs, bytes and the roofline time predict measured latency (all points)."""
    ms = [p["measured_ms"] for p in points]
    return {x: {**loglog_fit([p[key] for p in points], ms), "spearman_rho": spearman([p[key] for p in points], ms)}
            for x, key in (("flops", "flops"), ("bytes", "bytes"), ("roofline", "roofline_ms"))}


def _check_same_run(meta: dict[str, Any], other: dict[str, Any], what: str, keys: tuple[str, ...]) -> None:
    diff = {k: (meta[k], other.get(k)) for k in keys if other.get(k) != meta[k]}
    if diff:
        raise ValueError(f"{what} comes from a different run than the latency breakdown: {diff}")


def build(breakdown_json: str | Path, calibrate_json: str | Path, flopcheck_jsons: list[str | Path],
          out_json: str | Path) -> dict[str, Any]:
    """Write the study's e1_flops_vs_latency.json."""
    data = json.loads(Path(breakdown_json).read_text())
    meta = data["meta"]
    cal = json.loads(Path(calibrate_json).read_text())
    _check_same_run(meta, cal, f"calibration {calibrate_json}", ("dtype", "device_type"))
    checks = []
    for path in flopcheck_jsons:
        fc = json.loads(Path(path).read_text())
        _check_same_run(meta, fc["meta"], f"flop check {path}", ("model", "dtype", "device_type"))
        checks.append({"image": fc["image"], "prompt": fc["prompt"], "variant": fc["variant"], "knobs": fc["knobs"],
                       "prefill_tokens": fc["prefill_tokens"],
                       "stages": {s: {k: v[k] for k in ("analytic", "counted", "ratio", "zero_counted_ops")}
                                  for s, v in fc["stages"].items()},
                       "zero_counted_ops": fc["zero_counted_ops"]})
    points = [p for row in data["configs"] for p in points_of(row, meta, cal)]
    if len(points) < 2:
        raise ValueError(f"{breakdown_json} gives {len(points)} (configuration, stage) points; need at least 2")
    result = {
        "meta": {**{k: meta[k] for k in ("model", "device", "device_type", "dtype", "weights", "torch", "protocol")},
                 "variants": sorted({p["variant"] or "" for p in points}), "calibration": cal,
                 "convention": CONVENTION},
        "fits": fits(points),
        "inversions": inversions(points),
        "equal_flops_spread": equal_flops_spread(points),
        "decode_roofline": decode_roofline(points),
        "flop_check": checks,
        "points": points,
    }
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(out_json).write_text(json.dumps(result, indent=1) + "\n")
    return result
