"""The cross-model figure: the four stages per model at each image (one panel per backend), and each stage's
latency against its analytic FLOPs across models (log-log)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt

from e1.crossmodel import CROSS_RULE
from e1.jobs.io import read_json
from e1.names import STAGES
from e1.plots.common import COLORS, LABELS, image_area, save

MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]


def plot_cross_model(table: str | Path, out_png: str | Path) -> None:
    data = read_json(table, CROSS_RULE)
    rows, meta = data["configs"], data["meta"]
    models = meta["models"]
    backends = sorted({r["backend"] for r in rows})
    images = sorted({r["image"] for r in rows}, key=image_area)
    fig, axes = plt.subplots(1, len(backends) + 1, figsize=(6.5 * len(backends) + 6, 5.2))
    for ax, backend in zip(axes, backends):
        labels, x = [], 0
        for image in images:
            for m in models:
                r = next((r for r in rows if r["model"] == m and r["image"] == image and r["backend"] == backend), None)
                if r is None:
                    continue
                bottom = 0.0
                for s in STAGES:
                    ax.bar(x, r["ms"][s], bottom=bottom, color=COLORS[s], label=LABELS[s] if x == 0 else None)
                    bottom += r["ms"][s]
                labels.append(f"{m}\n{image}")
                x += 1
            x += 0.5
        ticks = [i + 0.5 * (i // len(models)) for i in range(len(labels))]
        ax.set_xticks(ticks, labels, rotation=90, fontsize=6)
        ax.set_ylabel("median ms per request (stages summed)")
        ax.set_title(f"stages per model, backend {backend}", fontsize=9)
        ax.legend(fontsize=7)
    ax = axes[-1]
    for i, m in enumerate(models):
        for s in STAGES:
            pts = [(r["flops"][s], r["ms"][s]) for r in rows if r["model"] == m and r["flops"][s] > 0 and r["ms"][s] > 0]
            if pts:
                ax.scatter(*zip(*pts), color=COLORS[s], marker=MARKERS[i % len(MARKERS)], s=22,
                           label=f"{m}" if s == STAGES[0] else None, edgecolors="black", linewidths=0.3)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("analytic FLOPs of the stage (decode: N-1 steps summed)")
    ax.set_ylabel("median ms")
    ax.set_title("latency vs FLOPs across models (colour = stage, marker = model)", fontsize=9)
    ax.legend(fontsize=7)
    n = {r["decode_tokens"] for r in rows}
    stand_in = [m for m in models if m.endswith("-tiny")]
    warn = (f"\n{', '.join(stand_in)}: scaled-down stand-ins, not the released models' timings" if stand_in else "")
    fig.suptitle(f"Cross-model stage latency: {', '.join(models)}\nprompt {rows[0]['prompt']}, N = "
                 f"{'/'.join(map(str, sorted(n)))} (1 prefill + N-1 decode steps); {meta['device']}, {meta['dtype']}, "
                 f"{'/'.join(meta['weights'])} weights{warn}", fontsize=9)
    save(fig, out_png)
