"""`e1 describe`: what a configuration costs in shapes and parameters, without running it."""

from __future__ import annotations

from typing import Any

from e1.roofline import flops, traffic
from e1.model.arch import Arch, load_arch
from e1.inputs.images import parse_size
from e1.model.preprocess import TEMPLATE_TOKENS, check_context
from e1.vlm.families import layout_for, prefill_tokens


def param_counts(arch: Arch) -> dict[str, int]:
    """Parameter counts from the model built on the meta device (no memory, no time)."""
    from e1.model.build import build_model  # torch import only when asked

    return build_model(arch, device="meta", dtype="bfloat16").param_counts()


def describe(model: str, image: str, prompt_tokens: int, decode_tokens: int = 1, moe_top_k: int | None = None,
             max_crops: int | None = None) -> dict[str, Any]:
    """Counts that drive each stage for one configuration (knobs: see Arch.with_knobs)."""
    arch = load_arch(model).with_knobs(moe_top_k=moe_top_k, max_crops=max_crops)
    if prompt_tokens < 0:
        raise ValueError(f"prompt tokens must be >= 0, got {prompt_tokens}")
    if decode_tokens < 1:
        raise ValueError(f"decode tokens (new tokens) must be >= 1, got {decode_tokens}")
    w, h = parse_size(image)
    layout = layout_for(arch, w, h)
    text_tokens = TEMPLATE_TOKENS + prompt_tokens
    prefill = prefill_tokens(arch, w, h, text_tokens)
    check_context(arch, prefill, decode_tokens)
    counts = {**layout.counts(), "prefill_tokens": prefill}
    return {
        "model": arch.name,
        "image": f"{w}x{h}",
        "moe_top_k": arch.llm.get("top_k", 0),
        "max_crops": arch.preprocess.get("max_crops", 1),
        "params": param_counts(arch),
        "vision": layout.counts(),
        "prompt_tokens": prompt_tokens,
        "text_tokens": text_tokens,
        "prefill_tokens": prefill,
        "decode_tokens": decode_tokens,
        "flops": flops.stage_flops(arch, counts),
        "bytes": traffic.stage_bytes(arch, counts, dtype_bytes=2),
        "convention": "N new tokens = 1 prefill forward (yields token 1) + N-1 decode steps; "
        "text tokens = prompt + 4 template tokens (' User', ':', ' Assistant', ':'); prefill adds BOS (MolmoE, "
        "LLaVA); "
        "flops: analytic, 2 per multiply-add, matrix products only (see e1.roofline.flops); bytes: analytic minimum "
        "device-memory traffic in bfloat16, uniform-routing expectation for prefill experts (see e1.roofline.traffic)",
    }


def render_table(d: dict[str, Any]) -> str:
    """Readable text version of `describe`'s result."""
    p, v = d["params"], d["vision"]
    rows = [
        ("model", f"{d['model']} (" + (f"top-{d['moe_top_k']} experts" if d["moe_top_k"] else "dense LLM")
         + f", max {d['max_crops']} crops)"),
        ("image (WxH)", f"{d['image']} -> resized {v['resized'][0]}x{v['resized'][1]}"
         + (" (downscaled: larger than max_crops tiles allow)" if v["downscaled"] else "")),
        ("tiling (rows x cols)", f"{v['tiling'][0]} x {v['tiling'][1]}"),
        ("vision encoder", f"{v['vit_crops']} crops" + (" (tiles + 1 global)" if v["vit_crops"] > 1 else "")
         + f", {v['vit_tokens']} ViT tokens"),
        ("projector", f"{v['pooled_features']} pooled features computed"),
        ("prefill", f"{v['inserted_features']} features inserted, {v['image_tokens']} image tokens, "
         f"{d['text_tokens']} text tokens, {d['prefill_tokens']} prefill tokens"),
        ("decode", f"{d['decode_tokens']} new tokens = 1 prefill + {d['decode_tokens'] - 1} decode steps"),
        ("params total", f"{p['total'] / 1e9:.3f} B"),
        ("  vision encoder", f"{p['vision_encoder'] / 1e6:.1f} M"),
        ("  projector", f"{p['projector'] / 1e6:.1f} M"),
        ("  llm", f"{p['llm'] / 1e9:.3f} B"),
        ("  llm active/token", f"{p['llm_active_per_token'] / 1e9:.3f} B (top-k experts + lm_head, no embedding)"),
        *((f"{stage}", f"{f['total'] / 1e9:,.1f} GFLOP, {d['bytes'][stage]['total'] / 1e9:,.2f} GB (bf16)")
          for stage, f in d["flops"].items()),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {val}" for k, val in rows)
