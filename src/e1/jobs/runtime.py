"""What every model job shares: its device, its variant's architecture and knobs, its model, its inputs,
and the facts recorded beside its results."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from PIL import Image

from e1 import knobs as knob_table
from e1.inputs.prompts import read_prompt
from e1.jobs.spec import ModelJob
from e1.model.arch import Arch, load_arch
from e1.model.build import build_model, resolve_dtype
from e1.model.graphs import check_graph_support
from e1.model.preprocess import load_image
from e1.model.routing import set_routing


def resolve_device(name: str) -> torch.device:
    """'cuda' must really be a GPU: never fall back to the CPU silently."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was requested but torch {torch.__version__} sees no CUDA GPU "
            "(is this a GPU node? CUDA_VISIBLE_DEVICES?); refusing to measure on the CPU instead"
        )
    return device


def variant_arch(spec: ModelJob) -> tuple[Arch, dict[str, Any]]:
    """The job's architecture (top-k and max_crops applied) and its knobs, every one spelled out (e1.knobs)."""
    base = load_arch(spec.model)
    knobs = knob_table.resolve(spec.knobs, base)
    return base.with_knobs(moe_top_k=knobs["moe_top_k"], max_crops=knobs["max_crops"]), knobs


def resolve_job(spec: ModelJob) -> tuple[Arch, dict[str, Any], torch.device, torch.dtype]:
    """A model job's architecture, knobs, device and dtype; a cuda_graph variant that cannot be captured there
    is refused before anything is built."""
    arch, knobs = variant_arch(spec)
    device, dtype = resolve_device(spec.device), resolve_dtype(spec.dtype)
    if knobs["backend"] == "cuda_graph":
        check_graph_support(knobs, device.type, dtype)
    return arch, knobs, device, dtype


def build_for(spec: ModelJob, arch: Arch, knobs: dict[str, Any], device: torch.device) -> nn.Module:
    """The job's model, with its routing mode applied."""
    model = build_model(arch, device=str(device), dtype=spec.dtype, weights=spec.weights, seed=spec.seed,
                        attn_implementation=knobs["attn_implementation"],
                        experts_implementation=knobs["experts_implementation"])
    set_routing(model, knobs["moe_routing"])
    return model


def job_inputs(spec: ModelJob) -> tuple[Image.Image, dict[str, Any]]:
    """The job's image (decoded) and prompt record (checked); e1.model.stage_inputs.prepare puts them on the
    device."""
    return load_image(spec.image_path), read_prompt(spec.prompt_path)


def job_meta(spec: ModelJob, model: nn.Module, device: torch.device, dtype: torch.dtype, env: dict[str, Any],
             prompt: dict[str, Any]) -> dict[str, Any]:
    """The run facts every model job's artifacts carry: what ran where, which weights were loaded (and how)
    and where the prompt's token ids came from."""
    return {
        "model": model.arch.name, "weights": spec.weights, "weights_loaded": model.weights_report,
        "token_ids": prompt["source"], "seed": spec.seed, "device": env["device_name"],
        "device_type": device.type, "dtype": str(dtype).removeprefix("torch."), "torch": env["torch"],
        "transformers": env["transformers"], "env": env,
    }

