"""The model adapter boundary: what every model family provides to the pipeline, and where (no torch import:
the workflow reads this while it plans).

A family's architectures are data (e1/model/archs/<name>.json, `"family": ...`). Its adapter provides
  layout(arch, width, height)     counts of one image (torch-free): vit_crops, vit_tokens, pooled_features,
                                  inserted_features, image_tokens (e1.vlm.layout)
  prepare(arch, image, ids, ...)  preprocessing through the model's own image processor -> (inputs, layout);
                                  `inputs.input_ids` (1, T) is the LLM sequence
  a model class, built on a device with seeded random weights, whose stage API is
    stage_vision(inp) -> features; stage_projector(features, inp) -> embeds;
    stage_prefill(inp, embeds) -> (logits (1, vocab), cache); decode_step(token (1, 1), cache) -> (logits, cache)
  and, for the CUDA-graph decode step and the other tools, `llm` (a transformers text model), `lm_head`,
    `llm_config`, rope_ids(positions), experts_in_use(), decode_experts(), param_counts()
  stage_flops(arch, counts) / stage_bytes(arch, counts, ...) analytic FLOPs and bytes (e1.roofline, e1.vlm.flops)
  component ranges for the profiler: transformers' module names (e1.profile.ranges)
  which knobs apply: moe_top_k and moe_routing only with experts, max_crops only with Molmo's tiling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from e1.model.arch import Arch


@dataclass(frozen=True)
class Family:
    model: str  # "module:Class" of the model, imported when a model is built
    inputs: str  # module whose prepare() makes a request's inputs
    code: tuple[str, ...]  # e1 modules (paths under src/e1) that a job of this family runs beyond the shared ones
    moe: bool  # the LLM has routed experts (moe_top_k, moe_routing, experts_implementation apply)
    crops: bool  # Molmo's multi-crop tiling (max_crops applies)


FAMILIES: dict[str, Family] = {
    "molmoe": Family("e1.model.molmoe:MolmoE", "e1.model.stage_inputs", ("model/molmoe.py", "model/stage_inputs.py"),
                     moe=True, crops=True),
    "llava": Family("e1.vlm.llava:Llava", "e1.vlm.llava", ("vlm/llava.py",), moe=False, crops=False),
    "qwen2_5_vl": Family("e1.vlm.qwen2_5_vl:Qwen2_5_VL", "e1.vlm.qwen_inputs",
                         ("vlm/qwen2_5_vl.py", "vlm/qwen_inputs.py"), moe=False, crops=False),
    "qwen3_vl_moe": Family("e1.vlm.qwen3_vl_moe:Qwen3VLMoe", "e1.vlm.qwen_inputs",
                           ("vlm/qwen3_vl_moe.py", "vlm/qwen_inputs.py"), moe=True, crops=False),
}


def family(arch: Arch) -> Family:
    if arch.family not in FAMILIES:
        raise ValueError(f"{arch.name}: family {arch.family!r}; known families: {', '.join(FAMILIES)}")
    return FAMILIES[arch.family]


def layout_for(arch: Arch, width: int, height: int) -> Any:
    """The counts and token layout of a width x height image for `arch` (no pixels touched)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height} (WIDTHxHEIGHT)")
    family(arch)
    if arch.family == "molmoe":
        from e1.model.preprocess import layout_for as molmo_layout

        return molmo_layout(arch, width, height)
    from e1.vlm import layout

    return layout.llava_layout(arch, width, height) if arch.family == "llava" else layout.qwen_layout(arch, width, height)


def prefill_tokens(arch: Arch, width: int, height: int, text_tokens: int) -> int:
    """LLM positions of one request: [BOS] + the image block + the text."""
    bos = 1 if arch.family in ("molmoe", "llava") else 0
    return bos + layout_for(arch, width, height).image_tokens + text_tokens
