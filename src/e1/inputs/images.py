"""Study images: deterministic synthetic natural-looking RGB pictures, one per WIDTHxHEIGHT (rule image)."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from e1.jobs.io import atomic_path

# The largest image side the study takes (config schema and `e1 image`). Molmo never uses more pixels than
# its largest tiling (12 tiles: at most 12 x 224 + 112 = 2800 px on a side; 64 tiles: 14448), and beyond
# that an image is only downscaled; making an image costs up to ~40 bytes of host memory per pixel
# (measured: 2.7 GB peak for 8192 x 8192, 0.8 GB to preprocess it), where 99999 x 99999 would need ~400 GB.
MAX_SIDE = 8192


def seed_of(*parts: object) -> int:
    """A stable 32-bit seed from labelled parts (the same in every process and Python version)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def parse_size(text: str) -> tuple[int, int]:
    """'1008x784' -> (1008, 784) as (width, height); each side 1..MAX_SIDE."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"image size {text!r}: expected WIDTHxHEIGHT, e.g. 1008x784") from None
    if not (0 < w <= MAX_SIDE and 0 < h <= MAX_SIDE):
        raise ValueError(f"image size {text!r}: width and height must be 1..{MAX_SIDE} pixels")
    return w, h


def synthetic_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Gradient sky, filled shapes and pixel noise: never constant, same bytes for the same arguments."""
    rng = np.random.default_rng(seed_of("image", width, height, seed))
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top, bottom, side = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    base = top * (1 - y) + bottom * y + (side - 128) * 0.3 * x  # (H, W, 3)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    del base
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1 + 1, y1 + 1), fill=color)
    noisy = np.asarray(img, dtype=np.int16) + rng.normal(0, 8, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def write_image(path: str | Path, width: int, height: int, seed: int = 0) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        synthetic_image(width, height, seed).save(tmp, format="PNG")
