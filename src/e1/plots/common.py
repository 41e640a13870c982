"""What every figure shares: the stand-in warning in its title, and how it is written."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from e1.inputs.images import parse_size  # noqa: E402
from e1.jobs.io import atomic_path  # noqa: E402

# The four stages, in pipeline order, as every figure colours and names them.
COLORS = {"vision_encoder": "#4C72B0", "projector": "#DD8452", "prefill": "#55A868", "decode": "#C44E52"}
LABELS = {"vision_encoder": "vision encoder", "projector": "projector", "prefill": "LLM prefill",
          "decode": "LLM decode"}


def image_area(size: str) -> int:
    """Pixels of a WIDTHxHEIGHT image: the figures order configurations by it."""
    w, h = parse_size(size)
    return w * h


def title_for(title: str, model: str, sep: str = " — ") -> str:
    """`title`, plus a warning when the model is a scaled-down stand-in (a -tiny architecture)."""
    if not model.endswith("-tiny"):
        return title
    return f"{title}{sep}{model}: scaled-down stand-in, not {model.removesuffix('-tiny')} timings"


def save(fig: plt.Figure, out_png: str | Path) -> None:
    """Lay out, write the PNG atomically (130 dpi, parent folders made) and close the figure."""
    fig.tight_layout()
    with atomic_path(out_png, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=130, format="png")
    plt.close(fig)
