"""The inputs of one request, on the device, shaped for the stage API; built outside every timed region."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from e1.model.arch import Arch
from e1.model.preprocess import VisionLayout, build_input_ids, preprocess
from e1.vlm.families import family


@dataclass
class StageInputs:
    """Everything one run needs, already on the device."""

    crops: torch.Tensor  # (n_crops, 3, 336, 336)
    patch_masks: torch.Tensor  # (n_crops, 576)
    input_ids: torch.Tensor  # (1, T)
    feature_index: torch.Tensor  # (inserted,)
    token_position: torch.Tensor  # (inserted,)


def prepare(arch: Arch, image: Image.Image, text_ids: list[int], device: torch.device,
            dtype: torch.dtype) -> tuple[Any, Any]:
    """CPU preprocessing + host-to-device copies through the model family's adapter (e1.vlm.families); returns
    inputs ready for a run (`input_ids` (1, T) is the LLM sequence), and the image's layout (its counts())."""
    if arch.family != "molmoe":
        return importlib.import_module(family(arch).inputs).prepare(arch, image, text_ids, device, dtype)
    return prepare_molmo(arch, image, text_ids, device, dtype)


def prepare_molmo(arch: Arch, image: Image.Image, text_ids: list[int], device: torch.device,
                  dtype: torch.dtype) -> tuple[StageInputs, VisionLayout]:
    """Molmo's preprocessing (e1.model.preprocess) onto the device."""
    pp = preprocess(arch, image)
    ids = build_input_ids(arch, pp.layout, text_ids)
    inp = StageInputs(
        crops=torch.from_numpy(pp.crops).to(device=device, dtype=dtype),
        patch_masks=torch.from_numpy(pp.patch_masks).to(device=device, dtype=dtype),
        input_ids=torch.from_numpy(ids)[None].to(device),
        feature_index=torch.from_numpy(pp.layout.feature_index).to(device),
        token_position=torch.from_numpy(pp.layout.token_position).to(device),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return inp, pp.layout
