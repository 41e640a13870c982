"""Attention / FFN-experts / router / other / idle inside prefill and decode (per token), ms and %."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from e1.plots.common import save, title_for  # noqa: E402
from e1.profile.breakdown import read_breakdown  # noqa: E402

PARTS = ("attention", "FFN / MoE experts", "MoE router", "other", "unclassified", "idle")
COLORS = {"attention": "#4C72B0", "FFN / MoE experts": "#C44E52", "MoE router": "#DD8452", "other": "#8C8C8C",
          "unclassified": "#D9D9D9", "idle": "#FFFFFF"}


def _parts(entry: dict) -> dict[str, float]:
    g = entry["groups_ms"]
    return {p: (entry["idle_ms"] if p == "idle" else g.get(p, 0.0)) for p in PARTS}


def plot_breakdown(breakdown_json: str | Path, out_png: str | Path) -> None:
    data = read_breakdown(breakdown_json)
    meta = data["meta"]
    configs = sorted(data["configs"], key=lambda c: (c["counts"]["vit_crops"], c["counts"]["prefill_tokens"],
                                                     c["decode_tokens"], c["variant"]))
    several = len({c["variant"] for c in configs}) > 1
    bars, labels, x = [], [], []
    pos = 0.0
    for i, c in enumerate(configs):
        if i and c["image"] != configs[i - 1]["image"]:
            pos += 1.0
        for stage, tag in (("prefill", "prefill"), ("decode_per_token", "decode/tok")):
            if stage in c["stages"]:
                bars.append(_parts(c["stages"][stage]))
                by_name = " (kernel names)" if c.get("component_source", "").startswith("kernel") else ""
                labels.append(f"{c['image']} {c['prompt']} n{c['decode_tokens']}\n{tag}{by_name}"
                              + (f"\n{c['variant']}" if several else ""))
                x.append(pos)
                pos += 1.0
        pos += 0.5
    x = np.array(x)
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.32 * len(x) + 3), 9), sharex=True)
    for ax, pct in zip(axes, (False, True)):
        bottom = np.zeros(len(bars))
        for p in PARTS:
            vals = np.array([b[p] for b in bars])
            if pct:
                vals = 100 * vals / np.array([sum(b.values()) for b in bars])
            ax.bar(x, vals, 0.85, bottom=bottom, color=COLORS[p], edgecolor="#444444", linewidth=0.4,
                   label=p if p != "idle" else "device idle (wall − busy)", hatch="//" if p == "idle" else None)
            bottom += vals
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("ms (prefill: per request;\ndecode: per token)")
    axes[0].legend(ncol=6, frameon=False, loc="upper left", fontsize=8)
    axes[1].set_ylabel("share of stage wall time (%)")
    axes[1].set_ylim(0, 100)
    axes[1].set_xticks(x)
    axes[1].set_xticklabels(labels, rotation=90, fontsize=6)
    fig.suptitle(title_for("E1: inside the LLM stages — attention vs MoE experts vs router, and device idle time",
                           meta["model"], "\n"), fontsize=12)
    axes[0].set_title(f"{meta['model']} · {meta['device']} · {meta['dtype']} · {meta['weights']} weights · "
                      f"torch.profiler device time, per-token decode over the profiled steps\n"
                      f"wall and idle are measured under the profiler, which slows the host: the JSON also "
                      f"gives idle against the un-profiled timed wall (idle_share_timed); cuda_graph bars: groups "
                      f"from kernel names learned on the eager profiles", fontsize=8)
    save(fig, out_png)
