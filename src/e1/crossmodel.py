"""The cross-model study (rule cross_model): every model of `models` at the same images, prompt and N, stage by
stage, beside each stage's analytic FLOPs (e1.roofline.flops, per family), from the measure jobs' summaries.

Per configuration: the four stage medians (decode = the sum of N-1 steps; decode_step = its median step), e2e,
the counts the stages run on, analytic FLOPs per stage (decode: the N-1 steps summed, each at its own
context) and the achieved TFLOP/s. Across models, per stage, image and backend: the models ordered by FLOPs
and by latency, and every pair where the model with more FLOPs is faster (an inversion: FLOPs do not predict
the ordering).
"""

from __future__ import annotations

import itertools
from operator import itemgetter
from pathlib import Path
from typing import Any

from e1.jobs.io import write_json
from e1.latency.table import read_same_setup
from e1.model.arch import load_arch
from e1.names import STAGES
from e1.roofline import flops

CROSS_RULE = "cross_model"
SAME = ("device", "dtype", "torch", "transformers")  # what every model's jobs must share to be compared


def row_of(summary: dict[str, Any]) -> dict[str, Any]:
    meta = summary["meta"]
    arch = load_arch(meta["model"]).with_knobs(moe_top_k=summary["knobs"]["moe_top_k"],
                                                max_crops=summary["knobs"]["max_crops"])
    counts = summary["counts"]
    f = flops.stage_flops(arch, counts)
    t, steps = counts["prefill_tokens"], summary["decode_steps"]
    stage_f = {"vision_encoder": f["vision_encoder"]["total"], "projector": f["projector"]["total"],
               "prefill": f["prefill"]["total"],
               "decode": sum(sum(flops.decode_step(arch, t + i).values()) for i in range(steps))}
    ms = {s: summary["stages"][s]["median_ms"] for s in STAGES}
    return {
        "model": meta["model"], "family": arch.family, "image": summary["image"], "prompt": summary["prompt"],
        "decode_tokens": summary["decode_tokens"], "variant": summary["variant"], "backend": summary["knobs"]["backend"],
        "counts": {k: counts[k] for k in ("vit_crops", "vit_tokens", "pooled_features", "image_tokens", "prefill_tokens")
                   if k in counts},
        "ms": ms, "e2e_ms": summary["stages"]["e2e"]["median_ms"],
        "decode_step_ms": (summary["decode_step"] or {}).get("median_ms"),
        "share": {s: ms[s] / sum(ms.values()) for s in STAGES},
        "flops": stage_f,
        "tflops_per_s": {s: (stage_f[s] / (ms[s] * 1e-3) / 1e12 if ms[s] > 0 else None) for s in STAGES},
        "weights": meta["weights"], "dtype": meta["dtype"], "device": meta["device"],
    }


def inversions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, image and backend: model pairs where more FLOPs ran in less time."""
    out = []
    key = itemgetter("image", "backend")
    for (image, backend), group in itertools.groupby(sorted(rows, key=key), key=key):
        group = list(group)
        for stage in STAGES:
            for a, b in itertools.combinations(group, 2):
                hi, lo = (a, b) if a["flops"][stage] > b["flops"][stage] else (b, a)
                if hi["flops"][stage] > lo["flops"][stage] and hi["ms"][stage] < lo["ms"][stage]:
                    out.append({"stage": stage, "image": image, "backend": backend, "more_flops": hi["model"],
                                "fewer_flops": lo["model"], "flops_ratio": hi["flops"][stage] / lo["flops"][stage],
                                "latency_ratio": hi["ms"][stage] / lo["ms"][stage]})
    return out


def dominant(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model, image and backend: the stage with the largest share of the four stages' time."""
    return [{"model": r["model"], "image": r["image"], "backend": r["backend"],
             "stage": max(STAGES, key=lambda s: r["ms"][s]), "share": max(r["share"].values())} for r in rows]


def cross_model(summaries: list[str | Path], out: str | Path) -> dict[str, Any]:
    """Rule cross_model: the table of every model's configurations at the cross-model regime."""
    configs = read_same_setup(summaries, SAME, "the cross-model table (one machine's runs only)")
    first = configs[0]["meta"]
    rows = [row_of(c) for c in configs]
    result = {
        "meta": {k: first[k] for k in SAME} | {
            "models": list(dict.fromkeys(r["model"] for r in rows)),
            "convention": first["convention"],
            "flops_convention": "analytic, 2 FLOPs per multiply-add, matrix products only (e1.roofline.flops, "
                                "e1.vlm.flops); decode = the N-1 steps summed",
            "weights": sorted({r["weights"] for r in rows}),
        },
        "configs": rows,
        "dominant_stage": dominant(rows),
        "inversions": inversions(rows),
    }
    write_json(out, result)
    return result
