"""The torch device a job asked for: a GPU must really be there, never a silent fallback to the CPU."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'cuda' must really be a GPU: never fall back to the CPU silently."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was requested but torch {torch.__version__} sees no CUDA GPU "
            "(is this a GPU node? CUDA_VISIBLE_DEVICES?); refusing to measure on the CPU instead"
        )
    return device
