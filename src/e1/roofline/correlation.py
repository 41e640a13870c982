"""How well one quantity predicts another: log-log least squares (R²) and Spearman's rank correlation."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _pair(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {a.shape} and {b.shape}")
    if a.size < 2:
        raise ValueError(f"need at least 2 points, got {a.size}")
    return a, b


def ranks(x: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the average of the ranks they span."""
    v = np.asarray(x, dtype=np.float64)
    order = np.argsort(v, kind="mergesort")
    r = np.empty(v.size)
    s = v[order]
    i = 0
    while i < v.size:
        j = i
        while j + 1 < v.size and s[j + 1] == s[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def _pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    da, db = a - a.mean(), b - b.mean()
    denom = np.sqrt((da**2).sum() * (db**2).sum())
    return float((da * db).sum() / denom) if denom > 0 else None


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's ρ: Pearson correlation of the (tie-averaged) ranks; None when either side is constant."""
    a, b = _pair(x, y)
    return _pearson(ranks(a), ranks(b))


def loglog_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float | int | None]:
    """Least squares log10(y) = slope * log10(x) + intercept; r2 = 1 - SS_res / SS_tot (None if y constant)."""
    a, b = _pair(x, y)
    bad = [v for v in (*a, *b) if not v > 0]
    if bad:
        raise ValueError(f"log-log fit needs positive values, got {bad[:5]}")
    lx, ly = np.log10(a), np.log10(b)
    if np.all(lx == lx[0]):
        raise ValueError(f"log-log fit needs at least two distinct x values, got only {a[0]}")
    slope, intercept = np.polyfit(lx, ly, 1)
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    ss_res = float(((ly - (slope * lx + intercept)) ** 2).sum())
    return {"slope": float(slope), "intercept": float(intercept), "r2": 1 - ss_res / ss_tot if ss_tot > 0 else None,
            "n": int(a.size)}
