"""Qwen2.5-VL's and Qwen3-VL's request inputs: transformers' Qwen2VLImageProcessor (smart resize, patches
flattened in merge-block order, the frame repeated to the temporal patch size), and the vision index tables,
computed on the host with transformers' own helpers (transformers.vision_utils) during preprocessing, as e1 does
for Molmo's crops: the vision stage then runs device work only. The attention segment bounds stay on the host
(transformers' SDPA path splits its sequence by them), so the vision stage can be captured in a CUDA graph.
"""

from __future__ import annotations

import functools
import json

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from transformers import vision_utils as vu

from e1.model.arch import Arch
from e1.vlm.layout import (ImageLayout, feature_positions, input_ids, mrope_positions, processor_key,
                           qwen_layout)


@dataclass
class QwenInputs:
    pixel_values: torch.Tensor  # (patches, 3 * temporal * patch * patch)
    vision_positions: torch.Tensor  # (patches, 2) row, col of each patch, merge-block order
    cu_seqlens: torch.Tensor  # (2,) int32, host: the image is one attention segment
    input_ids: torch.Tensor  # (1, T)
    feature_position: torch.Tensor  # (features,) where the image embeddings go
    rope_positions: torch.Tensor  # (3, T) temporal, height, width positions
    rope_delta: int  # decode positions: cache length + rope_delta
    grid_thw: torch.Tensor  # (1, 3) temporal, rows, cols of patches (what transformers' own forward takes)
    window_index: torch.Tensor | None = None  # Qwen2.5-VL: (patches / merge^2,) window order of merged units
    reverse_index: torch.Tensor | None = None  # its inverse
    cu_window_seqlens: torch.Tensor | None = None  # host int32: the windows' bounds
    interp_index: torch.Tensor | None = None  # Qwen3-VL: (patches, 4) rows of the learned position grid
    interp_weight: torch.Tensor | None = None  # (patches, 4) their bilinear weights


def processor(arch: Arch):
    """transformers' Qwen2VLImageProcessor with the architecture's values (nothing is downloaded)."""
    return _processor(processor_key(arch))


@functools.cache
def _processor(key: str):  # built once per architecture, not in every run's preprocessing
    v, pp = json.loads(key)
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(size={"shortest_edge": pp["min_pixels"], "longest_edge": pp["max_pixels"]},
                                 patch_size=v["patch_size"], merge_size=v["spatial_merge_size"],
                                 temporal_patch_size=v["temporal_patch_size"], image_mean=pp["image_mean"],
                                 image_std=pp["image_std"])


def prepare(arch: Arch, image: Image.Image, text_ids: list[int], device: torch.device, dtype: torch.dtype
            ) -> tuple[QwenInputs, ImageLayout]:
    v = arch.vision
    layout = qwen_layout(arch, *image.size)
    out = processor(arch)(images=image.convert("RGB"), return_tensors="np")
    grid = torch.from_numpy(np.asarray(out["image_grid_thw"])).long()  # (1, 3)
    if tuple(grid[0, 1:].tolist()) != layout.grid:
        raise RuntimeError(f"transformers' processor made a {tuple(grid[0].tolist())} grid, e1's layout "
                           f"{layout.grid}: the two resize rules disagree")
    merge = v["spatial_merge_size"]
    ids = input_ids(arch, layout, text_ids)
    rope, delta = mrope_positions(arch, layout, len(ids) - layout.image_tokens)
    to = {"device": device}
    inp = QwenInputs(
        pixel_values=torch.from_numpy(np.ascontiguousarray(out["pixel_values"])).to(device=device, dtype=dtype),
        vision_positions=vu.get_vision_position_ids(grid, merge).to(**to),
        cu_seqlens=vu.get_vision_cu_seqlens(grid),
        input_ids=torch.from_numpy(ids)[None].to(**to),
        feature_position=torch.from_numpy(feature_positions(arch, layout)).to(**to),
        rope_positions=torch.from_numpy(rope).to(**to), rope_delta=delta, grid_thw=grid.to(**to))
    if "window_size" in v:
        window, cu_window = vu.get_vision_window_index(grid, merge, v["window_size"], v["patch_size"])
        inp.window_index, inp.reverse_index = window.to(**to), torch.argsort(window).to(**to)
        inp.cu_window_seqlens = cu_window
    if "num_position_embeddings" in v:
        side = int(v["num_position_embeddings"] ** 0.5)
        index, weight = vu.get_vision_interpolation_indices_and_weights(
            grid, side, mode="bilinear", align_corners=True, spatial_merge_size=merge)
        inp.interp_index, inp.interp_weight = index.to(**to), weight.to(device=device, dtype=dtype)
    return inp, layout
