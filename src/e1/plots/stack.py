"""Stage stack plot: vision encoder / projector / prefill / decode per configuration, ms and %."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from e1.latency.table import read_latency  # noqa: E402
from e1.names import STAGES  # noqa: E402
from e1.plots.common import COLORS, LABELS, image_area, save, title_for  # noqa: E402


def knobs_text(knobs: dict) -> str:
    return (f"{knobs['attn_implementation']} attention, {knobs['experts_implementation']} experts, "
            f"{knobs['backend']} backend, top-{knobs['moe_top_k']} experts, max {knobs['max_crops']} crops, "
            f"{knobs['moe_routing']} routing")


def subtitle(meta: dict, configs: list[dict]) -> str:
    variants = {c["variant"]: c["knobs"] for c in configs}
    how = knobs_text(next(iter(variants.values()))) if len(variants) == 1 else \
        f"{len(variants)} variants (attn.experts.backend.k<top-k>.c<max crops>.<routing>, named under each bar)"
    return (f"{meta['model']} · {meta['device']} · {meta['dtype']} · {meta['weights']} weights · {how} · "
            f"medians of {meta['protocol']['timed']} timed runs after {meta['protocol']['warmup']} warm-up")


def plot_stack(latency_json: str | Path, out_png: str | Path) -> None:
    save(stack_figure(read_latency(latency_json)), out_png)


def stack_figure(data: dict) -> plt.Figure:
    """The stack plot of a stage latency table (three panels: ms, %, the stages before decode)."""
    meta, configs = data["meta"], data["configs"]
    # group: image (outer, by pixel count) -> prompt length -> decode length -> variant
    configs = sorted(configs, key=lambda c: (image_area(c["image"]), c["prompt_tokens"], c["decode_tokens"],
                                             c["variant"]))
    several = len({c["variant"] for c in configs}) > 1
    x = np.arange(len(configs), dtype=float)
    gap = 0.0
    for i in range(1, len(configs)):  # gaps between image and prompt groups
        if configs[i]["image"] != configs[i - 1]["image"]:
            gap += 1.0
        elif configs[i]["prompt"] != configs[i - 1]["prompt"]:
            gap += 0.4
        x[i] += gap
    ms = {s: np.array([c["stages"][s]["median_ms"] for c in configs]) for s in STAGES}
    # host overhead (eager minus the cuda_graph twin), drawn hatched at the top of each eager stage
    over = {s: np.array([min(max((c.get("host_overhead") or {}).get("ms", {}).get(s, 0.0), 0.0), ms[s][i])
                         for i, c in enumerate(configs)]) for s in STAGES}
    total = sum(ms.values())

    fig, (ax_ms, ax_pct, ax_fixed) = plt.subplots(
        3, 1, figsize=(max(10, 0.42 * len(configs) + 3), 11), sharex=True,
        gridspec_kw={"height_ratios": [3, 2, 2]})
    bottom_ms = np.zeros(len(configs))
    bottom_pct = np.zeros(len(configs))
    bottom_fixed = np.zeros(len(configs))
    labelled = False
    for s in STAGES:
        ax_ms.bar(x, ms[s], 0.8, bottom=bottom_ms, color=COLORS[s], label=LABELS[s])
        pct = 100 * ms[s] / total
        ax_pct.bar(x, pct, 0.8, bottom=bottom_pct, color=COLORS[s])
        if over[s].any():
            kw = {"fill": False, "hatch": "///", "edgecolor": "0.15", "linewidth": 0}
            ax_ms.bar(x, over[s], 0.8, bottom=bottom_ms + ms[s] - over[s], **kw,
                      label=None if labelled else "host overhead (eager − cuda_graph twin)")
            ax_pct.bar(x, 100 * over[s] / total, 0.8, bottom=bottom_pct + pct - 100 * over[s] / total, **kw)
            labelled = True
        bottom_ms += ms[s]
        bottom_pct += pct
        if s != "decode":
            ax_fixed.bar(x, ms[s], 0.8, bottom=bottom_fixed, color=COLORS[s])
            bottom_fixed += ms[s]
    ax_ms.set_ylabel("latency per request\n(ms, median)")
    ax_ms.legend(loc="upper left", ncol=5, frameon=False)
    ax_ms.grid(axis="y", alpha=0.3)
    ax_ms.set_ylim(0, bottom_ms.max() * 1.15)
    ax_pct.set_ylabel("share of the four\nstages (%)")
    ax_pct.set_ylim(0, 100)
    ax_pct.grid(axis="y", alpha=0.3)
    ax_fixed.set_ylabel("before decode (ms):\nvision + projector + prefill")
    ax_fixed.grid(axis="y", alpha=0.3)
    ax_fixed.set_xticks(x)
    ax_fixed.set_xticklabels([f"{c['prompt']} ({c['prompt_tokens']}t)\n{c['decode_tokens']} new"
                              + (f"\n{c['variant']}" if several else "") for c in configs], rotation=90, fontsize=7)
    for image in dict.fromkeys(c["image"] for c in configs):
        xs = [xi for xi, c in zip(x, configs) if c["image"] == image]
        c0 = next(c for c in configs if c["image"] == image)
        counts = "" if several else (f": {c0['counts']['vit_crops']} crops, {c0['counts']['pooled_features']} "
                                     f"pooled, {c0['counts']['inserted_features']} in LLM")
        ax_ms.annotate(f"{image}{counts}", xy=(np.mean(xs), 1.0),
                       xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    fig.suptitle(title_for("E1: where MolmoE inference time goes, by stage", meta["model"], "\n"), fontsize=13,
                 y=0.995)
    width = max(60, int(fig.get_figwidth() * 13))  # characters of 8-pt text that fit the axes, with margin
    text = subtitle(meta, configs) + "; N new tokens = 1 prefill + N−1 decode steps; image preprocessing (CPU) not shown"
    ax_ms.set_title("\n".join(textwrap.wrap(text, width)), fontsize=8, pad=16)
    return fig
