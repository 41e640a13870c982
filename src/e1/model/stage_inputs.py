"""The inputs of one request, on the device, shaped for the stage API; built outside every timed region."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from e1.model.arch import Arch
from e1.model.preprocess import VisionLayout, build_input_ids, preprocess


@dataclass
class StageInputs:
    """Everything one run needs, already on the device."""

    crops: torch.Tensor  # (n_crops, 3, 336, 336)
    patch_masks: torch.Tensor  # (n_crops, 576)
    input_ids: torch.Tensor  # (1, T)
    feature_index: torch.Tensor  # (inserted,)
    token_position: torch.Tensor  # (inserted,)


def prepare(arch: Arch, image: Image.Image, text_ids: list[int], device: torch.device,
            dtype: torch.dtype) -> tuple[StageInputs, VisionLayout]:
    """CPU preprocessing + host-to-device copies; returns inputs ready for a run, and the vision layout."""
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
