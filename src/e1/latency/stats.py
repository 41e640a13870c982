"""Summary statistics of repeated timings."""

from __future__ import annotations

from typing import Iterable

import numpy as np


def summarize(values_ms: Iterable[float]) -> dict[str, float | int]:
    """mean, median, p95, p99 (linear interpolation), std (sample, ddof=1), min, max, n, cv = std/mean."""
    v = np.asarray(list(values_ms), dtype=np.float64)
    if v.size == 0:
        raise ValueError("cannot summarize an empty set of timings")
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {
        "mean_ms": mean,
        "median_ms": float(np.median(v)),
        "p95_ms": float(np.percentile(v, 95)),
        "p99_ms": float(np.percentile(v, 99)),
        "std_ms": std,
        "min_ms": float(v.min()),
        "max_ms": float(v.max()),
        "n": int(v.size),
        "cv": std / mean if mean > 0 else 0.0,
    }
