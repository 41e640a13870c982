"""Scaling curves: prefill vs input tokens, decode vs generated tokens, per-step decode vs context position."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from e1.jobs.io import ArtifactError, read_parquet, rebuild_hint  # noqa: E402
from e1.latency.table import read_latency  # noqa: E402
from e1.plots.common import save, title_for  # noqa: E402


def slope(x: list[float] | np.ndarray, y: list[float] | np.ndarray) -> float | None:
    """Least-squares slope of y on x; None with fewer than two distinct x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    return float(np.polyfit(x, y, 1)[0]) if np.unique(x).size >= 2 else None


def _label(name: str, s: float | None, unit: str) -> str:
    return f"{name}: {'n/a' if s is None else format(s, '.3g')} {unit}"


def read_rows(path: str | Path) -> pd.DataFrame:
    """A measure job's per-run rows (Parquet), checked: the columns, and every ms finite and >= 0."""
    df = read_parquet(path, "measure", columns=["config_id", "stage", "step", "ms"])
    timed = df[df.stage != "unattributed"].ms
    if df.empty or not np.isfinite(df.ms).all() or (timed < 0).any():
        raise ArtifactError(f"{path}: ms must be finite and >= 0 in at least one row; {rebuild_hint(path, 'measure')}")
    return df


def step_medians(parquets: list[str | Path], prefill_tokens: dict[str, int]) -> pd.DataFrame:
    """Median over timed runs of every decode step: config_id, step, position (cache length before it), ms."""
    df = pd.concat([read_rows(p) for p in parquets])
    steps = df[df.stage == "decode_step"].groupby(["config_id", "step"], as_index=False)["ms"].median()
    steps["position"] = steps.config_id.map(prefill_tokens) + steps.step - 1
    return steps


def plot_scaling(latency_json: str | Path, parquets: list[str | Path], out_png: str | Path) -> None:
    data = read_latency(latency_json)
    meta, configs = data["meta"], data["configs"]
    rows = pd.DataFrame([{"id": c["id"], "variant": c.get("variant") or "", "image": c["image"],
                          "crops": c["counts"]["vit_crops"],
                          "decode_tokens": c["decode_tokens"], "decode_steps": c["decode_steps"],
                          "prefill_tokens": c["counts"]["prefill_tokens"],
                          "prefill_ms": c["stages"]["prefill"]["median_ms"],
                          "decode_ms": c["stages"]["decode"]["median_ms"]} for c in configs])
    images = rows.sort_values("crops").image.unique()
    colors = dict(zip(images, plt.cm.viridis(np.linspace(0, 0.85, len(images)))))
    fig, (ax_p, ax_d, ax_s) = plt.subplots(1, 3, figsize=(17, 5.5))

    several = rows.variant.nunique() > 1  # sweep variants: one line per variant too, told apart by line style
    styles = dict(zip(sorted(rows.variant.unique()), ["-", "--", ":", "-."] * len(rows)))

    def name(variant: str, what: str) -> str:
        return f"{variant} {what}" if several else what

    for (variant, n), g in rows.groupby(["variant", "decode_tokens"]):
        g = g.sort_values("prefill_tokens")
        ax_p.plot(g.prefill_tokens, g.prefill_ms, "o-", ms=4, lw=1, alpha=0.8,
                  label=_label(name(variant, f"N = {n} new tokens"), slope(g.prefill_tokens, g.prefill_ms),
                               "ms/token"))
    ax_p.set_xlabel("prefill tokens (BOS + image tokens + text tokens)")
    ax_p.set_ylabel("prefill latency (ms, median)")
    ax_p.set_title("prefill vs input tokens, one line per decode length\n(slope: least squares over the line)",
                   fontsize=9)

    for (variant, image), g in rows[rows.decode_steps > 0].groupby(["variant", "image"]):
        mean = g.groupby("decode_steps", as_index=False)["decode_ms"].mean()
        ax_d.scatter(g.decode_steps, g.decode_ms, color=colors[image], s=12, alpha=0.6)
        ax_d.plot(mean.decode_steps, mean.decode_ms, styles[variant], color=colors[image],
                  label=_label(name(variant, image), slope(g.decode_steps, g.decode_ms), "ms/token"))
    ax_d.set_xlabel("generated tokens after the first (N−1 decode steps)")
    ax_d.set_ylabel("decode latency (ms, median)")
    ax_d.set_title("decode vs generated tokens, one line per image size\n(dots: prompts; line: their mean)",
                   fontsize=9)

    steps = step_medians(parquets, dict(zip(rows.id, rows.prefill_tokens)))
    by_id = rows.set_index("id")
    for cid, g in steps.groupby("config_id"):
        ax_s.plot(g.position, g.ms, styles[by_id.variant[cid]], marker=".", ms=3, lw=0.8, alpha=0.6,
                  color=colors[by_id.image[cid]])
    for image in images:
        g = steps[steps.config_id.map(by_id.image) == image]
        s = slope(g.position, g.ms)
        ax_s.plot([], [], color=colors[image], label=_label(image, None if s is None else 1e3 * s, "µs/position"))
    ax_s.set_xlabel("context position (cache length before the step)")
    ax_s.set_ylabel("decode step latency (ms, median over runs)")
    ax_s.set_title("per-step decode latency vs position, one line per configuration", fontsize=9)

    for ax in (ax_p, ax_d, ax_s):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, loc="lower right" if ax is ax_s else "upper left")
    fig.suptitle(f"{title_for('E1: scaling curves', meta['model'])}\n{meta['model']} · {meta['device']} · {meta['dtype']} · {meta['weights']} weights · "
                 f"medians of {meta['protocol']['timed']} timed runs · N new tokens = 1 prefill + N−1 decode steps",
                 fontsize=10)
    save(fig, out_png)
