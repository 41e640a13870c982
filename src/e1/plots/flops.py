"""FLOPs vs measured latency: log-log scatter per (configuration, stage) with the roofline, and efficiency."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from e1.plots.common import COLORS, LABELS, save, title_for  # noqa: E402
from e1.roofline.flops_vs_latency import read_flops  # noqa: E402

STAGES = tuple(COLORS)  # vision_encoder, projector, prefill, decode


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _scatter(ax, points: list[dict], data: dict) -> None:
    cal, fit = data["meta"]["calibration"], data["fits"]["flops"]
    for s in STAGES:
        ps = [p for p in points if p["stage"] == s]
        if not ps:
            continue
        x = np.array([p["flops"] for p in ps]) / 1e9
        ax.vlines(x, [p["roofline_ms"] for p in ps], [p["measured_ms"] for p in ps], color=COLORS[s], alpha=0.25,
                  lw=1)
        ax.scatter(x, [p["roofline_ms"] for p in ps], marker="_", color=COLORS[s], s=40, alpha=0.8)
        ax.scatter(x, [p["measured_ms"] for p in ps], color=COLORS[s], s=28, label=LABELS[s], zorder=3,
                   edgecolor="white", lw=0.4)
    xs = np.geomspace(min(p["flops"] for p in points) / 2, max(p["flops"] for p in points) * 2, 50)
    ax.plot(xs / 1e9, 1e3 * xs / (cal["matmul_tflops"] * 1e12), "k--", lw=1,
            label=f"compute roof: FLOPs / {cal['matmul_tflops']:.3g} TFLOP/s (measured)")
    ax.plot(xs / 1e9, 10 ** (fit["slope"] * np.log10(xs) + fit["intercept"]), color="0.5", lw=1, ls=":",
            label="log-log least-squares fit")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo = min(min(p["roofline_ms"], p["measured_ms"]) for p in points)
    ax.set_ylim(lo / 2, max(p["measured_ms"] for p in points) * 60)  # headroom: the notes sit above the data
    ax.set_xlabel("analytic FLOPs of the stage (GFLOP, log)")
    ax.set_ylabel("measured latency (ms, median, log)")
    ax.grid(alpha=0.3, which="both", lw=0.4)
    ax.legend(loc="lower right", fontsize=7, frameon=True)
    ax.text(0.02, 0.98, f"FLOPs → latency: R² = {_fmt(fit['r2'], '.2f')} (log-log fit), "
            f"Spearman ρ = {_fmt(fit['spearman_rho'], '.2f')}, n = {fit['n']}\n"
            f"(bytes → latency: R² = {_fmt(data['fits']['bytes']['r2'], '.2f')}, "
            f"ρ = {_fmt(data['fits']['bytes']['spearman_rho'], '.2f')})\n"
            "dash: roofline time max(FLOPs/peak, bytes/bandwidth); line: gap to the measured time",
            transform=ax.transAxes, va="top", fontsize=8, bbox={"fc": "white", "ec": "0.7", "alpha": 0.9})
    if data["inversions"]:
        inv = data["inversions"][0]
        pair = [p for p in points if p["id"] == inv["id"] and p["stage"] in (inv["more_flops"], inv["less_flops"])]
        ax.scatter([p["flops"] / 1e9 for p in pair], [p["measured_ms"] for p in pair], s=160, facecolor="none",
                   edgecolor="#8B0000", lw=1.2, zorder=4)
        ax.text(0.02, 0.855, f"{inv['id']}: {LABELS[inv['more_flops']]} {inv['more_flops_gflop']:.4g} GFLOP in "
                f"{inv['more_flops_ms']:.3g} ms,\n{LABELS[inv['less_flops']]} {inv['less_flops_gflop']:.4g} GFLOP "
                f"in {inv['less_flops_ms']:.3g} ms: {inv['flops_ratio']:.0f}× the FLOPs, "
                f"{inv['latency_ratio']:.0f}× less time (circled)",
                transform=ax.transAxes, va="top", fontsize=8, color="#8B0000")
    if data["equal_flops_spread"]:  # same work, different execution: points stacked at one x
        top = max(data["equal_flops_spread"], key=lambda x: x["ratio"] or 0)
        impl = ", ".join(f"{k.split('_')[0]} {top['slowest'][k]}" for k in top["slowest"])
        fast = ", ".join(f"{k.split('_')[0]} {top['fastest'][k]}" for k in top["fastest"])
        ax.text(0.02, 0.745, f"equal FLOPs, different implementation: up to {top['ratio']:.1f}× latency "
                f"({LABELS[top['stage']]}, {top['image']} {top['prompt']} N={top['decode_tokens']}):\n"
                f"{top['max_ms']:.3g} ms with {impl}; {top['min_ms']:.3g} ms with {fast}",
                transform=ax.transAxes, va="top", fontsize=8, color="#1F4E79")


def _efficiency(ax, points: list[dict]) -> None:
    rng = np.random.default_rng(0)  # horizontal jitter only
    labels = []
    for s in STAGES:
        eff = np.array([p["efficiency"] for p in points if p["stage"] == s and p["efficiency"]])
        if eff.size == 0:
            continue
        ax.scatter(len(labels) + rng.uniform(-0.15, 0.15, eff.size), 100 * eff, color=COLORS[s], s=18, alpha=0.8)
        labels.append(f"{LABELS[s]}\nmedian {100 * np.median(eff):.2g} %")
    ax.set_yscale("log")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("roofline time / measured time (%, log)")
    ax.set_title("how close each stage runs to the device's ceilings", fontsize=9)
    ax.grid(axis="y", alpha=0.3, which="both", lw=0.4)


def plot_flops(flops_json: str | Path, out_png: str | Path) -> None:
    data = read_flops(flops_json)
    meta, points, cal = data["meta"], data["points"], data["meta"]["calibration"]
    fig, (ax, ax_eff) = plt.subplots(1, 2, figsize=(14, 6.5), gridspec_kw={"width_ratios": [2.2, 1]})
    _scatter(ax, points, data)
    _efficiency(ax_eff, points)
    fig.suptitle(title_for("E1: FLOPs do not predict latency — one point per (configuration, stage)", meta["model"],
                           "\n"), fontsize=12)
    ax.set_title(f"{meta['model']} · {meta['device']} · {meta['dtype']} · {meta['weights']} weights · "
                 f"medians of {meta['protocol']['timed']} timed runs · decode = all N−1 steps\n"
                 f"roofline from calibrate on {cal['device']}: {cal['matmul_tflops']:.3g} TFLOP/s matmul, "
                 f"{cal['copy_gbps']:.4g} GB/s copy (read + write)", fontsize=8)
    save(fig, out_png)
