"""Concurrent vs one-at-a-time measure jobs (benchmarks/device_multigpu.sh): which GPU each job claimed,
whether the jobs overlapped in time, and how far their median stage latencies moved.

Usage: python benchmarks/multigpu_compare.py CONCURRENT_DIR ALONE_DIR [--apps APPS_LOG] [--out JSON]
Each DIR is a snakemake working directory (its results/<run>/measure/*.json are read). APPS_LOG is the
optional nvidia-smi compute-apps sampling log the device script writes ("t <unix time>" lines, each
followed by "pid, gpu_bus_id" lines).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

STAGES = ("preprocess", "vision_encoder", "projector", "prefill", "decode", "e2e")


def load(workdir: str | Path) -> dict[str, dict[str, Any]]:
    """Measure summaries under workdir/results/*/measure/, by configuration id."""
    found = sorted(Path(workdir).glob("results/*/measure/*.json"))
    if not found:
        raise FileNotFoundError(f"no measure summaries under {workdir}/results/*/measure/")
    out = {}
    for p in found:
        s = json.loads(p.read_text())
        out[s["id"]] = s
    return out


def marks(s: dict[str, Any]) -> dict[str, float]:
    """The job's wall-clock marks (time.time()): GPU claimed (if it claimed), start, runs start/end, end."""
    wall = s["meta"].get("wall_clock")
    if wall is None:
        raise ValueError(f"{s['id']}: the summary has no meta.wall_clock (measured before timestamps were recorded)")
    claim = s["meta"]["env"].get("gpu_claim")
    return ({"claimed": claim["claimed_at"]} if claim else {}) | wall


def job_row(s: dict[str, Any], t0: float) -> dict[str, Any]:
    env = s["meta"]["env"]
    claim = env.get("gpu_claim") or {}
    return {
        "id": s["id"],
        "claim_source": claim.get("source"),
        "gpu_index": claim.get("index"),
        "gpu_uuid": claim.get("uuid"),
        "cuda_visible_devices": env.get("cuda_visible_devices"),
        "pci_bus_id": (env.get("gpu_before") or {}).get("pci.bus_id"),
        "device": s["meta"]["device"],
        "wall_s": {k: round(v - t0, 3) for k, v in (marks(s)).items()},
        "median_ms": {st: s["stages"][st]["median_ms"] for st in STAGES},
    }


def overlap_s(a: dict[str, float], b: dict[str, float], start: str = "runs_start", end: str = "runs_end") -> float:
    return max(0.0, min(a[end], b[end]) - max(a[start], b[start]))


def apps_samples(path: str | Path) -> dict[str, Any]:
    """From the sampling log: how many samples saw two or more processes on one GPU."""
    samples: list[dict[str, list[str]]] = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("t "):
            samples.append({})
        elif line.strip() and samples:
            pid, bus = (v.strip() for v in line.split(",")[:2])
            samples[-1].setdefault(bus, []).append(pid)
    busy = [s for s in samples if s]
    shared = [s for s in busy if any(len(p) > 1 for p in s.values())]
    both = [s for s in busy if len(s) >= 2]
    return {"samples": len(samples), "samples_with_processes": len(busy),
            "samples_with_two_gpus_busy": len(both), "samples_with_a_gpu_shared": len(shared),
            "shared_examples": shared[:3]}


def compare(concurrent_dir: str | Path, alone_dir: str | Path, apps: str | Path | None = None) -> dict[str, Any]:
    conc, alone = load(concurrent_dir), load(alone_dir)
    if set(conc) != set(alone):
        raise ValueError(f"the two runs measured different configurations: concurrent {sorted(conc)}, "
                         f"alone {sorted(alone)}")
    result: dict[str, Any] = {}
    for mode, runs in (("concurrent", conc), ("alone", alone)):
        t0 = min(min(marks(s).values()) for s in runs.values())
        rows = [job_row(runs[k], t0) for k in sorted(runs)]
        walls = [runs[k]["meta"]["wall_clock"] for k in sorted(runs)]
        pairs = [(rows[i]["id"], rows[j]["id"], round(overlap_s(walls[i], walls[j]), 3))
                 for i in range(len(rows)) for j in range(i + 1, len(rows))]
        gpus = [r["gpu_uuid"] or r["gpu_index"] or r["cuda_visible_devices"] for r in rows]
        result[mode] = {"jobs": rows, "runs_overlap_s": pairs,
                        "distinct_gpus": len(set(gpus)) == len(gpus) and None not in gpus}
    result["median_ratio_concurrent_over_alone"] = {
        k: {st: conc[k]["stages"][st]["median_ms"] / alone[k]["stages"][st]["median_ms"]
            if alone[k]["stages"][st]["median_ms"] > 0 else None for st in STAGES} for k in sorted(conc)}
    if apps is not None and Path(apps).is_file():
        result["concurrent_apps"] = apps_samples(apps)
    return result


def render(r: dict[str, Any]) -> str:
    lines = []
    for mode in ("concurrent", "alone"):
        m = r[mode]
        lines.append(f"== {mode}: {len(m['jobs'])} jobs, distinct GPUs: {m['distinct_gpus']}")
        for j in m["jobs"]:
            w = j["wall_s"]
            lines.append(f"  {j['id']:<28} GPU index {j['gpu_index']} uuid {j['gpu_uuid']} bus {j['pci_bus_id']} "
                         f"({j['claim_source']}); claimed {w.get('claimed', float('nan')):.1f} s, "
                         f"start {w['start']:.1f} s, runs {w['runs_start']:.1f}-"
                         f"{w['runs_end']:.1f} s, end {w['end']:.1f} s")
        for a, b, ov in m["runs_overlap_s"]:
            lines.append(f"  runs of {a} and {b} overlap {ov:.1f} s")
            if mode == "concurrent" and ov == 0:
                lines.append("  WARNING: these jobs did not run at the same time: no concurrency was measured")
            if mode == "alone" and ov > 0:
                lines.append("  WARNING: these jobs overlapped: the 'alone' baseline is not alone")
    lines.append("== median ms: alone -> concurrent (ratio)")
    for k, ratios in r["median_ratio_concurrent_over_alone"].items():
        alone = {j["id"]: j for j in r["alone"]["jobs"]}[k]["median_ms"]
        conc = {j["id"]: j for j in r["concurrent"]["jobs"]}[k]["median_ms"]
        lines.append(f"  {k}: " + ", ".join(
            f"{st} {alone[st]:.2f} -> {conc[st]:.2f}" + (f" ({ratios[st]:.3f})" if ratios[st] is not None else "")
            for st in STAGES))
    if "concurrent_apps" in r:
        a = r["concurrent_apps"]
        lines.append(f"== nvidia-smi samples during the concurrent run: {a['samples']}, with both GPUs busy "
                     f"{a['samples_with_two_gpus_busy']}, with one GPU shared by two processes "
                     f"{a['samples_with_a_gpu_shared']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("concurrent_dir")
    p.add_argument("alone_dir")
    p.add_argument("--apps", help="nvidia-smi compute-apps sampling log of the concurrent run")
    p.add_argument("--out", help="write the comparison as JSON here")
    a = p.parse_args(argv)
    r = compare(a.concurrent_dir, a.alone_dir, a.apps)
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=1) + "\n")
    print(render(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
