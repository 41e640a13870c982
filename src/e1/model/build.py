"""Building a model (MolmoE or a transformers VLM, e1.vlm.families): seeded random weights directly on the target device/dtype, or a local checkpoint."""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from e1.knobs import AXES
from e1.model.arch import Arch, load_arch
from e1.model.checkpoint import load_released
from e1.vlm.families import family

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
INIT_STD = 0.02


@contextmanager
def _defaults(device: torch.device | str, dtype: torch.dtype) -> Iterator[None]:
    """Create tensors on `device` in `dtype` (no CPU copy first)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(prev)


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}; allowed: {', '.join(DTYPES)}")
    return DTYPES[name]


@torch.no_grad()
def _init_random(model: nn.Module, seed: int) -> None:
    """Seeded init in place on the model's device: norms 1, biases 0, everything else N(0, 0.02)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if isinstance(owner, nn.LayerNorm) or "norm" in type(owner).__name__.lower():
            p.fill_(1.0 if leaf == "weight" else 0.0)
        elif leaf == "bias":
            p.zero_()
        else:
            p.normal_(0.0, INIT_STD, generator=gen)


def model_class(arch: Arch) -> type[nn.Module]:
    """The class that builds `arch` (its family's adapter, e1.vlm.families), imported on first use."""
    module, name = family(arch).model.split(":")
    return getattr(importlib.import_module(module), name)


def build_model(
    arch: Arch | str,
    device: str = "cpu",
    dtype: str = "float32",
    weights: str = "random",
    seed: int = 0,
    attn_implementation: str = AXES["attn_implementation"].default,
    experts_implementation: str = AXES["experts_implementation"].default,
) -> nn.Module:
    """Build `arch`'s model (MolmoE, or a transformers VLM through its adapter) on `device` in `dtype`.

    weights: "random" (seeded N(0, 0.02), made on the device) or, for MolmoE, a folder in the released layout
    (e1.model.checkpoint: a Hugging Face download, or one written by save_released); what was loaded is in
    `model.weights_report`. A folder whose config, names or shapes do not match is an error naming them.
    device="meta" builds shapes only (for parameter counts): weights and seed are not used.
    """
    arch = load_arch(arch) if isinstance(arch, str) else arch
    torch_dtype = resolve_dtype(dtype)
    cls = model_class(arch)
    if weights != "random" and arch.family != "molmoe":
        raise ValueError(f"weights {weights!r}: {arch.name} runs with weights: random only (a local checkpoint "
                         "loads for MolmoE, in the released allenai/MolmoE-1B-0924 layout)")
    if device == "meta":
        with _defaults("meta", torch_dtype):
            return cls(arch, attn_implementation, experts_implementation)
    with _defaults(device, torch_dtype):
        model = cls(arch, attn_implementation, experts_implementation)
    model.eval().requires_grad_(False)
    if weights == "random":
        _init_random(model, seed)
        model.weights_report = {"layout": "random", "seed": seed, "init": f"norms 1, biases 0, else N(0, {INIT_STD})"}
    else:
        model.weights_report = load_released(model, weights)
    return model
