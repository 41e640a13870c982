"""FLOPs and bytes against measured latency, per (configuration, stage), with a measured roofline.

For every configuration of the stage latency breakdown and every stage (vision encoder, projector,
prefill, decode = all N-1 steps, summed over the growing context; per step too): analytic FLOPs (e1.roofline.flops)
and bytes (e1.roofline.traffic, in the run's dtype), the measured median latency, the roofline time
max(FLOPs / peak, bytes / bandwidth) with peak and bandwidth measured by e1.roofline.calibrate, and the efficiency
roofline / measured. Rows with sweep knobs use the architecture with those knobs (Arch.with_knobs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from e1.jobs.io import ArtifactError, Record, write_json
from e1.knobs import AXES, IMPL_KNOBS, WORK_KNOBS
from e1.latency.table import read_latency
from e1.model.arch import Arch, load_arch
from e1.names import STAGES
from e1.roofline import flops, traffic
from e1.roofline.correlation import loglog_fit, spearman

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
CALIBRATE_RULE, FLOPCHECK_RULE, FLOPS_RULE = "calibrate", "flop_check", "flops_vs_latency"
CONVENTION = (
    "one point per (configuration, stage); flops: e1.roofline.flops (2 per multiply-add, matrix products only); bytes: "
    "e1.roofline.traffic (minimum device-memory traffic in the run's dtype; prefill experts: those the run's routing "
    "hit, from its measure job); decode = all N-1 decode steps, FLOPs and "
    "bytes summed over the steps with growing context (per_step: the mean step, measured per-step median); "
    "measured_ms: median of the timed runs; roofline_ms = max(flops / matmul peak, bytes / copy bandwidth), "
    "both measured by e1.roofline.calibrate (copy bandwidth counts read + write); efficiency = roofline_ms / measured_ms; "
    "fits: least squares of log10(measured_ms) on log10(x) over all points, R^2, and Spearman's rho (ties "
    "averaged); energy: the stage's J in one request (measure job's energy phase, e1.energy), gross and net of idle, "
    "per GFLOP and per GB of the analytic counts"
)


def roofline_ms(f: float, b: float, cal: dict[str, Any]) -> tuple[float, str]:
    """Roofline time (ms) of f FLOPs and b bytes, and which ceiling binds ('compute' or 'memory')."""
    compute, memory = f / (cal["matmul_tflops"] * 1e12), b / (cal["copy_gbps"] * 1e9)
    return 1e3 * max(compute, memory), "compute" if compute >= memory else "memory"


def stage_costs(arch: Arch, counts: dict[str, Any], decode_steps: int, dtype_bytes: int,
                experts_hit_per_layer: list[int] | None = None) -> dict[str, dict]:
    """Analytic FLOPs and bytes per stage; decode summed over its steps (context grows by one per step).
    experts_hit_per_layer: the prefill's measured routing (None: the uniform-routing expectation)."""
    f = flops.stage_flops(arch, counts)
    b = traffic.stage_bytes(arch, counts, dtype_bytes, experts_hit_per_layer)
    costs = {s: {"flops": f[s]["total"], "bytes": b[s]["total"]} for s in STAGES[:3]}
    t = counts["prefill_tokens"]
    step_f = [sum(flops.decode_step(arch, t + i).values()) for i in range(decode_steps)]
    step_b = [sum(traffic.decode_step(arch, t + i, dtype_bytes).values()) for i in range(decode_steps)]
    costs["decode"] = {"flops": sum(step_f), "bytes": sum(step_b)}
    return costs


def point_energy(row: dict[str, Any], stage: str, f: float, b: float) -> dict[str, Any]:
    """The stage's energy in one request (decode: all N-1 steps), gross and net of idle, per GFLOP and per GB."""
    e = row.get("energy") or {}
    if not e.get("measured") or stage not in e.get("stages", {}):
        return {"measured": False, "reason": e.get("reason") or "not recorded by its measure job"}
    times = row["decode_tokens"] - 1 if stage == "decode" else 1
    out: dict[str, Any] = {"measured": True}
    for kind in ("gross", "net"):
        j = times * e["stages"][stage][f"{kind}_j_per_call"]["median"]
        out[kind] = {"j": j, "j_per_gflop": j / (f / 1e9) if f else None, "j_per_gb": j / (b / 1e9) if b else None}
    return out


def points_of(row: dict[str, Any], meta: dict[str, Any], cal: dict[str, Any]) -> list[dict[str, Any]]:
    """One point per stage of one configuration (decode only when it has steps)."""
    knobs = row["knobs"]
    arch = load_arch(meta["model"]).with_knobs(moe_top_k=knobs["moe_top_k"], max_crops=knobs["max_crops"])
    if meta["dtype"] not in DTYPE_BYTES:
        raise ValueError(f"dtype {meta['dtype']!r}; allowed: {', '.join(DTYPE_BYTES)}")
    steps = int(row["decode_steps"])
    prefill_load = (row.get("routing") or {}).get("prefill")
    hit = [layer["experts_hit"] for layer in prefill_load["per_layer"]] if prefill_load else None
    costs = stage_costs(arch, row["counts"], steps, DTYPE_BYTES[meta["dtype"]], hit)
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
        p["energy"] = point_energy(row, s, f, b)
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
        impls = {tuple(p["knobs"].get(k, AXES[k].default) for k in IMPL_KNOBS) for p in ps}
        if len(impls) < 2:
            continue
        ms = [p["measured_ms"] for p in ps]
        fastest, slowest = min(ps, key=lambda p: p["measured_ms"]), max(ps, key=lambda p: p["measured_ms"])
        spread.append({"image": image, "prompt": prompt, "decode_tokens": n, "moe_top_k": top_k,
                       "max_crops": max_crops, "stage": stage, "flops": ps[0]["flops"], "n_rows": len(ps),
                       "min_ms": min(ms), "max_ms": max(ms), "ratio": max(ms) / min(ms) if min(ms) > 0 else None,
                       "fastest": {k: fastest["knobs"].get(k, AXES[k].default) for k in IMPL_KNOBS},
                       "slowest": {k: slowest["knobs"].get(k, AXES[k].default) for k in IMPL_KNOBS}})
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


def read_calibration(path: str | Path) -> dict[str, Any]:
    """The calibrate job's JSON, checked: positive ceilings."""
    rec = Record.load(path, CALIBRATE_RULE)
    rec.require("device", "device_type", "dtype", "method")
    rec.number("matmul_tflops", minimum=1e-9)
    rec.number("copy_gbps", minimum=1e-9)
    return rec.data


def read_flop_check(path: str | Path) -> dict[str, Any]:
    """A flop_check job's JSON, checked."""
    rec = Record.load(path, FLOPCHECK_RULE)
    rec.require("image", "prompt", "variant", "knobs", "prefill_tokens", "zero_counted_ops", "meta")
    for name in rec["stages"].expect(dict):
        rec["stages"][name].number("analytic")
        rec["stages"][name].number("counted")
    return rec.data


def read_flops(path: str | Path) -> dict[str, Any]:
    """The study's FLOPs-vs-latency JSON, checked (for the plot and the findings)."""
    rec = Record.load(path, FLOPS_RULE)
    rec["meta"].require("model", "device_type", "dtype", "calibration", "convention")
    for fit in ("flops", "bytes", "roofline"):
        rec["fits"][fit].require("r2", "slope", "n", "spearman_rho")
    for p in rec.items("points"):
        p.require("id", "stage", "knobs", "bound")
        for k in ("flops", "bytes", "measured_ms", "roofline_ms"):
            p.number(k)
    rec["inversions"].expect(list)
    rec["equal_flops_spread"].expect(list)
    return rec.data


def check_same_run(meta: dict[str, Any], other: dict[str, Any], what: str, keys: tuple[str, ...],
                   rule: str) -> None:
    diff = {k: (meta[k], other.get(k)) for k in keys if other.get(k) != meta[k]}
    if diff:
        raise ArtifactError(f"{what} comes from a different run than the stage latency table: {diff}; rebuild it "
                            f"with `snakemake --forcerun {rule}`")


def build(latency_json: str | Path, calibrate_json: str | Path, flopcheck_jsons: list[str | Path],
          out_json: str | Path) -> dict[str, Any]:
    """Write the study's e1_flops_vs_latency.json."""
    data = read_latency(latency_json)
    meta = data["meta"]
    cal = read_calibration(calibrate_json)
    check_same_run(meta, cal, f"calibration {calibrate_json}", ("dtype", "device_type"), CALIBRATE_RULE)
    checks = []
    for path in flopcheck_jsons:
        fc = read_flop_check(path)
        check_same_run(meta, fc["meta"], f"flop check {path}", ("model", "dtype", "device_type"), FLOPCHECK_RULE)
        checks.append({"image": fc["image"], "prompt": fc["prompt"], "variant": fc["variant"], "knobs": fc["knobs"],
                       "prefill_tokens": fc["prefill_tokens"],
                       "stages": {s: {k: v[k] for k in ("analytic", "counted", "ratio", "zero_counted_ops")}
                                  for s, v in fc["stages"].items()},
                       "zero_counted_ops": fc["zero_counted_ops"]})
    points = [p for row in data["configs"] for p in points_of(row, meta, cal)]
    if len(points) < 2:
        raise ArtifactError(f"{latency_json} gives {len(points)} (configuration, stage) points; a fit needs at "
                            "least 2: run more than one configuration")
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
    write_json(out_json, result)
    return result
