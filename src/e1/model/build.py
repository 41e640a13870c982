"""Building MolmoE: seeded random weights directly on the target device/dtype, or a local checkpoint."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from e1.jobs.io import atomic_path, read_json, write_json
from e1.knobs import AXES
from e1.model.arch import Arch, load_arch
from e1.model.molmoe import MolmoE

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
WEIGHTS_FILE = "model.safetensors"
META_FILE = "e1_model.json"
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


def build_model(
    arch: Arch | str,
    device: str = "cpu",
    dtype: str = "float32",
    weights: str = "random",
    seed: int = 0,
    attn_implementation: str = AXES["attn_implementation"].default,
    experts_implementation: str = AXES["experts_implementation"].default,
) -> MolmoE:
    """Build MolmoE on `device` in `dtype`.

    weights: "random" (seeded N(0, 0.02), made on the device) or a directory written by `save_weights`.
    A checkpoint whose keys or shapes do not match is an error naming them; nothing loads partially.
    device="meta" builds shapes only (for parameter counts): weights and seed are not used.
    """
    arch = load_arch(arch) if isinstance(arch, str) else arch
    torch_dtype = resolve_dtype(dtype)
    if device == "meta":
        with _defaults("meta", torch_dtype):
            return MolmoE(arch, attn_implementation, experts_implementation)
    with _defaults(device, torch_dtype):
        model = MolmoE(arch, attn_implementation, experts_implementation)
    model.eval().requires_grad_(False)
    if weights == "random":
        _init_random(model, seed)
    else:
        load_weights(model, weights)
    return model


def save_weights(model: MolmoE, directory: str | Path) -> Path:
    """Write model.safetensors + e1_model.json (the arch name) into `directory`."""
    out = Path(directory)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(out / META_FILE, {"model": model.arch.name})
    return out


@torch.no_grad()
def load_weights(model: MolmoE, directory: str | Path) -> None:
    """Load a checkpoint saved by `save_weights`; strict on keys and shapes."""
    path = Path(directory)
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(
            f"weights {str(directory)!r}: expected 'random' or a directory holding {WEIGHTS_FILE} (from e1's save_weights)"
        )
    meta = path / META_FILE
    if meta.is_file():
        saved = read_json(meta, None).get("model")
        if saved != model.arch.name:
            raise ValueError(f"checkpoint {str(directory)!r} is for model {saved!r}, not {model.arch.name!r}")
    device = next(model.parameters()).device
    try:
        state = load_file(str(file), device=str(device))
    except Exception as e:  # safetensors raises its own SafetensorError (header too large, truncated, ...)
        raise ValueError(f"weights file {str(file)!r} cannot be read as safetensors ({type(e).__name__}: {e}): "
                         "truncated or not a checkpoint? Use weights: random, or a directory written by e1's "
                         "save_weights") from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    )
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:10]) + (f" (+{len(items) - 10} more)" if len(items) > 10 else "")
                parts.append(f"{len(items)} {label}: {shown}")
        raise ValueError(f"checkpoint {str(directory)!r} does not match {model.arch.name}: " + "; ".join(parts))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)

