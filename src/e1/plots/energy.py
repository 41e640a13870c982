"""Energy stack plot: joules per request by stage, beside the latency stack (same configurations, same order)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from e1.energy.table import read_energy  # noqa: E402
from e1.names import STAGES  # noqa: E402
from e1.plots.common import COLORS, LABELS, image_area, save, title_for  # noqa: E402


def plot_energy(energy_json: str | Path, out_png: str | Path) -> None:
    save(energy_figure(read_energy(energy_json)), out_png)


def energy_figure(data: dict) -> plt.Figure:
    """Net J per request stacked by stage, each stage's share of energy beside its share of time; a machine
    without an energy counter gets a figure that says so (no numbers)."""
    meta = data["meta"]
    head = (f"{title_for('E1: where the energy goes', meta['model'])}\n{meta['model']} · {meta['device']} · "
            f"{meta['dtype']} · {meta['weights']} weights")
    rows = sorted((r for r in data["configs"] if r["measured"]),
                  key=lambda r: (image_area(r["image"]), r["prompt"], r["decode_tokens"], r["variant"]))
    if not rows:
        fig, ax = plt.subplots(figsize=(8, 3))
        ax.axis("off")
        ax.text(0.5, 0.5, f"energy not measured:\n{meta['reason']}", ha="center", va="center", wrap=True)
        fig.suptitle(head, fontsize=9)
        return fig
    x = np.arange(len(rows))
    fig, (ax_j, ax_pct) = plt.subplots(2, 1, figsize=(max(10, 0.42 * len(rows) + 3), 9), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 2]})
    stages = [s for s in STAGES if all(s in r["stages"] for r in rows)]
    joules = {s: np.array([r["stages"][s]["per_request_net_j"] for r in rows]) for s in stages}
    total = sum(joules.values())
    bottom, bottom_pct = np.zeros(len(rows)), np.zeros(len(rows))
    for s in stages:
        ax_j.bar(x, joules[s], 0.8, bottom=bottom, color=COLORS[s], label=LABELS[s])
        pct = 100 * joules[s] / total
        ax_pct.bar(x, pct, 0.8, bottom=bottom_pct, color=COLORS[s])
        bottom += joules[s]
        bottom_pct += pct
    for i, r in enumerate(rows):  # the spread of the per-request total (sum of each stage's min and max)
        lo = sum((r["decode_tokens"] - 1 if s == "decode" else 1) * r["stages"][s]["net_j_per_call"]["min"]
                 for s in stages)
        hi = sum((r["decode_tokens"] - 1 if s == "decode" else 1) * r["stages"][s]["net_j_per_call"]["max"]
                 for s in stages)
        ax_j.plot([i, i], [lo, hi], color="black", lw=0.8)
    ax_j.set_ylabel("J per request above idle (median; bar: min..max)")
    ax_j.legend(fontsize=8)
    ax_pct.set_ylabel("% of request energy")
    ax_pct.set_xticks(x, [r["id"].replace("__", "\n", 3) for r in rows], rotation=90, fontsize=6)
    p = meta["counter_period_ms"]
    fig.suptitle(f"{head}\nNVML energy counter (updates every {p['median']:.0f} ms); windows ≥ "
                 f"{rows[0]['min_periods']} updates, {rows[0]['repeats']} per stage; idle "
                 f"{meta['idle_w']['median']:.0f} W subtracted\nN new tokens = 1 prefill + N−1 decode steps "
                 "(decode: N−1 × one step at the mean context)", fontsize=9)
    return fig
