"""Molmo image preprocessing: tiling, resize+pad, overlapping crops, patch masks, token layout.

Every vision count the pipeline reports comes from here, kept apart because they drive different
stages: ViT crops/tokens (vision encoder), pooled features computed (connector), features inserted
into the LLM and prefill tokens (prefill).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from e1.model.arch import Arch

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)

# " User: {prompt} Assistant:" is the prompt template; in the GPT-NeoX BPE of MolmoE its fixed part is
# 4 tokens (" User", ":", " Assistant", ":"), the prompt's own tokens come between them.
TEMPLATE_TOKENS = 4


@dataclass
class VisionLayout:
    """Counts and token layout for one image; no pixels (cheap, used by `e1 describe`)."""

    image_size: tuple[int, int]  # (width, height) as given
    tiling: tuple[int, int]  # (rows, cols) of 336-px tiles
    resized: tuple[int, int]  # (width, height) of the image inside the padded canvas
    downscaled: bool  # True when no tiling within max_crops reaches scale >= 1
    vit_crops: int
    vit_tokens: int
    pooled_features: int
    inserted_features: int
    image_tokens: int
    tile_grid: tuple[int, int]  # (R, C) pooled rows/cols of the tile block
    # feature_index[i] (into the computed pooled features) is added at token position token_position[i]
    feature_index: np.ndarray = field(repr=False)
    token_position: np.ndarray = field(repr=False)
    image_token_ids: np.ndarray = field(repr=False)  # the image tokens, BOS excluded

    def counts(self) -> dict[str, Any]:
        return {
            "tiling": list(self.tiling),
            "vit_crops": self.vit_crops,
            "vit_tokens": self.vit_tokens,
            "pooled_features": self.pooled_features,
            "inserted_features": self.inserted_features,
            "image_tokens": self.image_tokens,
            "resized": list(self.resized),
            "downscaled": self.downscaled,
        }


@dataclass
class Preprocessed:
    """Model-ready arrays for one image plus its layout."""

    layout: VisionLayout
    crops: np.ndarray  # (vit_crops, 3, 336, 336) float32, CLIP-normalised; crop 0 is the global one
    patch_masks: np.ndarray  # (vit_crops, 576) float32: fraction of real (non-pad) pixels per patch


def select_tiling(height: int, width: int, window: int, max_crops: int) -> tuple[tuple[int, int], bool]:
    """Molmo's tiling choice for an image whose margin-free size is height x width.

    Candidates are (rows, cols) with rows*cols <= max_crops, ordered by (crops, rows). The scale a
    tiling needs is min(rows*window/height, cols*window/width). If none reaches 1, the largest scale
    wins (the image is downscaled); otherwise the smallest scale >= 1. Returns (tiling, downscaled).
    Sizes <= 0 (images no larger than the margins) are treated as 1 px: every tiling fits, (1, 1) wins.
    """
    height, width = max(height, 1), max(width, 1)
    candidates = sorted(
        ((r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops + 1) if r * c <= max_crops),
        key=lambda rc: (rc[0] * rc[1], rc[0]),
    )
    scales = [min(r * window / height, c * window / width) for r, c in candidates]
    if all(s < 1.0 for s in scales):
        best = max(range(len(scales)), key=lambda i: (scales[i], -i))
        return candidates[best], True
    best = min((i for i, s in enumerate(scales) if s >= 1.0), key=lambda i: (scales[i], i))
    return candidates[best], False


def _fit_size(height: int, width: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Aspect-preserving size of an image fitted inside out_h x out_w (Molmo's float32 rounding)."""
    scale = min(np.float32(out_h) / np.float32(height), np.float32(out_w) / np.float32(width))
    return max(int(np.float32(height) * scale), 1), max(int(np.float32(width) * scale), 1)


def resize_and_pad(image: np.ndarray, out_h: int, out_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize (bilinear, aspect kept) into out_h x out_w, centre it on zeros, CLIP-normalise.

    image: (H, W, 3) uint8. Returns (out_h, out_w, 3) float32 and a (out_h, out_w) bool mask of real pixels.
    """
    h, w = image.shape[:2]
    new_h, new_w = _fit_size(h, w, out_h, out_w)
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), dtype=np.float32) / 255.0
    top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
    canvas = np.zeros((out_h, out_w, 3), dtype=np.float32)
    canvas[top : top + new_h, left : left + new_w] = resized
    mask = np.zeros((out_h, out_w), dtype=bool)
    mask[top : top + new_h, left : left + new_w] = True
    return (canvas - CLIP_MEAN) / CLIP_STD, mask


def _kept_range(index: int, count: int, per_side: int, margin: int) -> range:
    """Pooled rows (or cols) of tile `index` of `count` that reach the LLM: margins only on outer edges."""
    start = 0 if index == 0 else margin
    stop = per_side if index == count - 1 else per_side - margin
    return range(start, stop)


def layout_for(arch: Arch, width: int, height: int) -> VisionLayout:
    """Tiling, counts and token layout for a width x height image (no pixels touched)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} (WIDTHxHEIGHT)")
    pp = arch.preprocess
    patch = arch.vision["patch_size"]
    crop = pp["crop_size"]
    margin_patches = sum(pp["overlap_margins"])  # 8 patches = 112 px
    window = crop - margin_patches * patch  # 224 px of each tile reach the LLM
    margin_px = margin_patches * patch
    tiling, downscaled = select_tiling(height - margin_px, width - margin_px, window, pp["max_crops"])
    rows, cols = tiling
    canvas_h, canvas_w = rows * window + margin_px, cols * window + margin_px
    new_h, new_w = _fit_size(height, width, canvas_h, canvas_w)

    pool = arch.connector["pool_size"]
    per_side = arch.pooled_per_side  # 12 pooled rows/cols per crop
    margin_pooled = pp["overlap_margins"][0] // pool  # 2
    window_pooled = window // patch // pool  # 8
    grid_r = rows * window_pooled + 2 * margin_pooled  # R = (rows*16+8)/2
    grid_c = cols * window_pooled + 2 * margin_pooled

    tok = arch.tokens
    vit_crops = rows * cols + 1
    per_crop = per_side * per_side

    # Global block: <im_start>, per_side x (per_side <im_patch> + <im_col>), <im_end>; starts after BOS.
    def block(r: int, c: int) -> list[int]:
        return [tok["im_start"]] + ([tok["im_patch"]] * c + [tok["im_col"]]) * r + [tok["im_end"]]

    global_ids = block(per_side, per_side)
    tile_ids = block(grid_r, grid_c)
    feat_idx: list[int] = []
    positions: list[int] = []
    g_start = 1 + 1  # BOS, <im_start>
    for r in range(per_side):
        for c in range(per_side):
            feat_idx.append(r * per_side + c)
            positions.append(g_start + r * (per_side + 1) + c)
    t_start = 1 + len(global_ids) + 1
    for ti in range(rows):
        for tj in range(cols):
            k = 1 + ti * cols + tj  # crop index; crop 0 is the global crop
            for r in _kept_range(ti, rows, per_side, margin_pooled):
                for c in _kept_range(tj, cols, per_side, margin_pooled):
                    gr, gc = ti * window_pooled + r, tj * window_pooled + c
                    feat_idx.append(k * per_crop + r * per_side + c)
                    positions.append(t_start + gr * (grid_c + 1) + gc)
    image_ids = np.array(global_ids + tile_ids, dtype=np.int64)
    assert len(feat_idx) == per_crop + grid_r * grid_c
    return VisionLayout(
        image_size=(width, height),
        tiling=(rows, cols),
        resized=(new_w, new_h),
        downscaled=downscaled,
        vit_crops=vit_crops,
        vit_tokens=vit_crops * (arch.patches_per_side**2 + 1),
        pooled_features=vit_crops * per_crop,
        inserted_features=len(feat_idx),
        image_tokens=len(image_ids),
        tile_grid=(grid_r, grid_c),
        feature_index=np.array(feat_idx, dtype=np.int64),
        token_position=np.array(positions, dtype=np.int64),
        image_token_ids=image_ids,
    )


def _patch_fractions(mask: np.ndarray, patch: int) -> np.ndarray:
    """(S, S) bool -> (S/patch * S/patch,) fraction of real pixels per patch, row-major."""
    n = mask.shape[0] // patch
    return mask.reshape(n, patch, n, patch).mean(axis=(1, 3), dtype=np.float32).reshape(-1)


def load_image(path: str | Path) -> Image.Image:
    """Open an image file, upright per its EXIF orientation; unreadable files are clear errors.

    The mode is kept as stored; `preprocess` converts to RGB.
    """
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read image {str(path)!r}: {e}") from e
    return ImageOps.exif_transpose(img)


def preprocess(arch: Arch, image: Image.Image) -> Preprocessed:
    """Turn a PIL image into crops, patch masks and the token layout (Molmo's recipe)."""
    if image.width <= 0 or image.height <= 0:
        raise ValueError(f"image size must be positive, got {image.width}x{image.height}")
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, RGBA, P, CMYK...: alpha is dropped, palettes expanded
    layout = layout_for(arch, image.width, image.height)
    pixels = np.asarray(image, dtype=np.uint8)
    crop = arch.preprocess["crop_size"]
    patch = arch.vision["patch_size"]
    window = crop - sum(arch.preprocess["overlap_margins"]) * patch
    rows, cols = layout.tiling
    margin_px = crop - window
    canvas, canvas_mask = resize_and_pad(pixels, rows * window + margin_px, cols * window + margin_px)
    glob, glob_mask = resize_and_pad(pixels, crop, crop)
    crops = [glob]
    masks = [_patch_fractions(glob_mask, patch)]
    for i in range(rows):
        for j in range(cols):
            y, x = i * window, j * window
            crops.append(canvas[y : y + crop, x : x + crop])
            masks.append(_patch_fractions(canvas_mask[y : y + crop, x : x + crop], patch))
    crops_chw = np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))
    return Preprocessed(layout=layout, crops=crops_chw, patch_masks=np.stack(masks))


def build_input_ids(arch: Arch, layout: VisionLayout, text_ids: list[int] | np.ndarray) -> np.ndarray:
    """BOS + image tokens + text tokens (the templated prompt), as a (T,) int64 array."""
    ids = np.concatenate([[arch.tokens["bos"]], layout.image_token_ids, np.asarray(text_ids, dtype=np.int64)])
    return ids.astype(np.int64)


def check_context(arch: Arch, prefill_tokens: int, new_tokens: int = 0) -> None:
    """Raise if prefill plus generated tokens exceed the LLM context."""
    limit = arch.llm["max_position_embeddings"]
    total = prefill_tokens + max(new_tokens - 1, 0)
    if total > limit:
        raise ValueError(
            f"sequence of {total} tokens ({prefill_tokens} prefill + {max(new_tokens - 1, 0)} decoded) "
            f"does not fit the {limit}-token context of {arch.name}"
        )
