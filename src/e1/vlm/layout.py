"""Token counts and LLM input ids of the transformers-based VLMs, from the image size alone (no torch, no pixels).

Counts are kept apart as for MolmoE (e1.model.preprocess.VisionLayout.counts), under the same keys, so every
table and figure reads them alike:
  vit_crops          images the encoder runs on (1: no tiling)
  vit_tokens         positions the encoder attends over (LLaVA: 576 patches + CLS; Qwen: every patch)
  pooled_features    features the projector outputs (LLaVA: 576; Qwen: patches / merge_size^2)
  inserted_features  features written into the LLM sequence (all of them)
  image_tokens       LLM positions the image takes (Qwen: the features + <|vision_start|> and <|vision_end|>)

LLM input ids: LLaVA  BOS, 576 x <image>, text;  Qwen  <|vision_start|>, n x <|image_pad|>, <|vision_end|>, text.
The text ids are the prompt record's (e1.inputs.prompts), the same template for every model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from e1.model.arch import Arch


@dataclass
class ImageLayout:
    """Counts and token layout of one image for one model."""

    image_size: tuple[int, int]  # (width, height) as given
    resized: tuple[int, int]  # (width, height) the encoder sees
    grid: tuple[int, int]  # (rows, cols) of patches
    vit_crops: int
    vit_tokens: int
    pooled_features: int
    image_tokens: int
    image_token_ids: np.ndarray = field(repr=False)  # the image block's ids, in sequence order
    feature_offset: int = 1  # position of the first feature in the LLM sequence

    @property
    def inserted_features(self) -> int:
        return self.pooled_features

    def counts(self) -> dict[str, Any]:
        return {"tiling": [1, 1], "vit_crops": self.vit_crops, "vit_tokens": self.vit_tokens,
                "pooled_features": self.pooled_features, "inserted_features": self.inserted_features,
                "image_tokens": self.image_tokens, "resized": list(self.resized), "downscaled": False,
                "patch_grid": list(self.grid)}


def processor_key(arch: Arch) -> str:
    """What an image processor is built from (the vision and preprocess values), as a hashable key."""
    return json.dumps([arch.vision, arch.preprocess], sort_keys=True)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's resize rule (its image processor's smart_resize): both sides multiples of `factor`, the area kept
    within [min_pixels, max_pixels], the aspect ratio kept as nearly as those allow. Returns (height, width)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {width}x{height}: Qwen's processor allows an aspect ratio of at most 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = max(factor, math.floor(height / beta / factor) * factor), max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def llava_layout(arch: Arch, width: int, height: int) -> ImageLayout:
    """CLIP's processor: shortest side to 336, centre crop 336x336; 576 patch features, the CLS dropped."""
    v = arch.vision
    side = v["image_size"] // v["patch_size"]
    n = side * side
    return ImageLayout((width, height), (v["image_size"],) * 2, (side, side), 1, n + 1, n, n,
                       np.full(n, arch.tokens["image"], dtype=np.int64), feature_offset=1)


def qwen_layout(arch: Arch, width: int, height: int) -> ImageLayout:
    """Qwen's processor: smart_resize to multiples of patch x merge; every patch is encoded, each merge x merge
    block of patches becomes one LLM token, framed by <|vision_start|> and <|vision_end|>."""
    v, pp, t = arch.vision, arch.preprocess, arch.tokens
    patch, merge = v["patch_size"], v["spatial_merge_size"]
    h, w = smart_resize(height, width, patch * merge, pp["min_pixels"], pp["max_pixels"])
    rows, cols = h // patch, w // patch
    patches = rows * cols
    features = patches // merge**2
    ids = np.concatenate([[t["vision_start"]], np.full(features, t["image"]), [t["vision_end"]]]).astype(np.int64)
    return ImageLayout((width, height), (w, h), (rows, cols), 1, patches, features, features + 2, ids,
                       feature_offset=1)


def input_ids(arch: Arch, layout: ImageLayout, text_ids: list[int] | np.ndarray) -> np.ndarray:
    """The LLM's (T,) int64 ids: [BOS] (LLaVA), the image block, then the text."""
    head = [arch.tokens["bos"]] if arch.family == "llava" else []
    return np.concatenate([np.asarray(head, dtype=np.int64), layout.image_token_ids,
                           np.asarray(text_ids, dtype=np.int64)]).astype(np.int64)


def feature_positions(arch: Arch, layout: ImageLayout) -> np.ndarray:
    """(features,) positions in the LLM sequence that the projector's outputs replace."""
    start = 1  # after BOS (LLaVA) or <|vision_start|> (Qwen)
    return np.arange(start, start + layout.pooled_features, dtype=np.int64)


def mrope_positions(arch: Arch, layout: ImageLayout, text_tokens: int) -> tuple[np.ndarray, int]:
    """Qwen's 3-D rotary positions (3, T) of [vision_start, image, vision_end, text] (its get_rope_index for one
    still image: temporal index constant, height and width indices follow the merged grid), and the rope delta
    (the next position minus T) that decode positions add."""
    merge = arch.vision["spatial_merge_size"]
    gh, gw = layout.grid[0] // merge, layout.grid[1] // merge
    start = 1  # <|vision_start|> at position 0
    hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    image = np.stack([np.zeros(gh * gw, dtype=np.int64), hh.ravel(), ww.ravel()]) + start  # (3, features)
    after = image.max() + 1
    tail = np.arange(after, after + 1 + text_tokens, dtype=np.int64)  # vision_end, then the text
    pos = np.concatenate([np.zeros((3, 1), dtype=np.int64), image, np.broadcast_to(tail, (3, len(tail)))], axis=1)
    return pos, int(pos.max()) + 1 - pos.shape[1]
