"""Expert load figure: how unevenly the router spreads tokens over the experts, and what it costs."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from e1.latency.table import read_latency, routing_pairs  # noqa: E402
from e1.plots.common import COLORS, image_area, save, title_for  # noqa: E402

MODE_COLORS = {"learned": "#8172B3", "balanced": "#937860"}


def plot_routing(latency_json: str | Path, out_png: str | Path) -> None:
    save(routing_figure(read_latency(latency_json)), out_png)


def routing_figure(data: dict) -> plt.Figure:
    """Three panels: busiest / mean per configuration (prefill and decode), the prefill's tokens per expert and
    layer for the largest learned-routing prefill, and prefill/decode time learned vs balanced where both ran."""
    meta = data["meta"]
    configs = sorted((c for c in data["configs"] if c.get("routing")),
                     key=lambda c: (image_area(c["image"]), c["prompt_tokens"], c["decode_tokens"], c["variant"]))
    if not configs:
        raise ValueError("no configuration of the stage latency table has routing counts (rerun rule measure)")
    pairs = routing_pairs(configs)
    fig, axes = plt.subplots(1, 3 if pairs else 2, figsize=(18 if pairs else 13, 5.5),
                             gridspec_kw={"width_ratios": [3, 2, 2] if pairs else [3, 2]})
    ax = axes[0]
    x = np.arange(len(configs))
    for off, ph, marker in ((-0.2, "prefill", "o"), (0.2, "decode", "s")):
        for mode, color in MODE_COLORS.items():
            idx = [i for i, c in enumerate(configs) if c["knobs"]["moe_routing"] == mode and c["routing"].get(ph)]
            if not idx:
                continue
            mean = [configs[i]["routing"][ph]["max_over_mean"]["mean"] for i in idx]
            top = [configs[i]["routing"][ph]["max_over_mean"]["max"] for i in idx]
            ax.bar(x[idx] + off, mean, 0.38, color=color, alpha=1.0 if ph == "prefill" else 0.55,
                   label=f"{ph}, {mode} (mean over layers)")
            ax.scatter(x[idx] + off, top, marker=marker, color="black", s=12, zorder=3)
    ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
    ax.set_xticks(x, [c["id"].replace("__", "\n", 3) for c in configs], rotation=90, fontsize=6)
    ax.set_ylabel("busiest expert's tokens / mean (dots: worst layer)")
    ax.set_title("Expert load per configuration (1 = even)")
    ax.legend(fontsize=7)

    learned = [c for c in configs if c["knobs"]["moe_routing"] == "learned"] or configs
    big = max(learned, key=lambda c: c["routing"]["prefill"]["tokens"])
    counts = np.array(big["routing"]["prefill"]["counts"], dtype=float)  # (layers, experts)
    ranked = -np.sort(-counts, axis=1)  # each layer's experts from busiest to idlest
    im = axes[1].imshow(ranked, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=axes[1], label="tokens routed in prefill")
    axes[1].set_xlabel("experts, busiest first (per layer)")
    axes[1].set_ylabel("layer")
    axes[1].set_title(f"{big['id']}\n{big['routing']['prefill']['tokens']} prefill tokens, "
                      f"{big['knobs']['moe_routing']} routing", fontsize=8)

    if pairs:
        ax = axes[2]
        px = np.arange(len(pairs))
        for off, s in ((-0.2, "prefill"), (0.2, "decode")):
            ratio = [p[s]["median_ms"] / q[s]["median_ms"] if q[s]["median_ms"] > 0 else np.nan
                     for p, q in ((a["stages"], b["stages"]) for a, b in pairs)]
            ax.bar(px + off, ratio, 0.38, color=COLORS[s], label=s)
        ax.axhline(1.0, color="0.4", lw=0.8, ls=":")
        ax.set_xticks(px, [a["id"].rsplit(".", 1)[0].replace("__", "\n", 3) for a, _ in pairs], rotation=90,
                      fontsize=6)
        ax.set_ylabel("median time, learned / balanced routing")
        ax.set_title("What the imbalance costs (equal FLOPs)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{title_for('E1: expert load', meta['model'])}\n{meta['model']} · {meta['device']} · "
                 f"{meta['dtype']} · {meta['weights']} weights · counts from one untimed request per configuration",
                 fontsize=9)
    return fig
