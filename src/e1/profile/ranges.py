"""Named profiler ranges for a model's components (MolmoE's, or a transformers VLM's by its module names), installed by wrapping modules of a built model.

Range names (record_function, so they appear in Kineto traces as user annotations): see e1.names.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

from torch import nn
from torch.profiler import record_function

from e1.names import COMP_RANGE as COMP


def component_map(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, range name) for every component the breakdown reports."""
    if model.arch.family != "molmoe":
        return _vision_ranges(model) + _llm_ranges(model)
    vit, llm = model.vision.vit, model.llm
    ranges: list[tuple[nn.Module, str]] = [(vit.embeddings, "vit_embed"), (vit.pre_layrnorm, "vit_norm")]
    for i, layer in enumerate(vit.encoder.layers):
        ranges += [(layer.self_attn, f"vit_attention@{i}"), (layer.mlp, f"vit_mlp@{i}"),
                   (layer.layer_norm1, f"vit_norm@{i}"), (layer.layer_norm2, f"vit_norm@{i}")]
    ranges += [(model.connector.pooling, "pooling"), (model.connector.projector, "projector_mlp"),
               (llm.embed_tokens, "embedding"), (llm.rotary_emb, "attention"), (llm.norm, "norm"),
               (model.lm_head, "lm_head")]
    for i, layer in enumerate(llm.layers):
        ranges += [(layer.self_attn, f"attention@{i}"), (layer.mlp.gate, f"moe_router@{i}"),
                   (layer.mlp.experts, f"moe_experts@{i}"), (layer.input_layernorm, f"norm@{i}"),
                   (layer.post_attention_layernorm, f"norm@{i}")]
    return ranges


def _vision_ranges(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """A transformers vision tower (CLIP, or Qwen's ViT and mergers) by transformers' module names."""
    v = model.vision
    if model.arch.family == "llava":
        vm = getattr(v, "vision_model", v)  # CLIPVisionModel holds its parts directly in transformers 5
        ranges = [(vm.embeddings, "vit_embed"), (vm.pre_layrnorm, "vit_norm"), (vm.post_layernorm, "vit_norm")]
        for i, layer in enumerate(vm.encoder.layers):
            ranges += [(layer.self_attn, f"vit_attention@{i}"), (layer.mlp, f"vit_mlp@{i}"),
                       (layer.layer_norm1, f"vit_norm@{i}"), (layer.layer_norm2, f"vit_norm@{i}")]
        return ranges + [(model.projector, "projector_mlp")]
    ranges = [(v.patch_embed, "vit_embed")]
    for i, block in enumerate(v.blocks):
        ranges += [(block.attn, f"vit_attention@{i}"), (block.mlp, f"vit_mlp@{i}"), (block.norm1, f"vit_norm@{i}"),
                   (block.norm2, f"vit_norm@{i}")]
    return ranges + [(v.merger, "projector_mlp")] + [(m, "projector_mlp") for m in getattr(v, "deepstack_merger_list", [])]


def _llm_ranges(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """A transformers decoder: attention, the dense MLP (ffn) or the router and experts, norms, head."""
    llm = model.llm
    ranges = [(llm.embed_tokens, "embedding"), (llm.rotary_emb, "attention"), (llm.norm, "norm"),
              (model.lm_head, "lm_head")]
    for i, layer in enumerate(llm.layers):
        mlp = layer.mlp
        ranges += [(layer.self_attn, f"attention@{i}"), (layer.input_layernorm, f"norm@{i}"),
                   (layer.post_attention_layernorm, f"norm@{i}")]
        if hasattr(mlp, "gate") and hasattr(mlp, "experts"):
            ranges += [(mlp.gate, f"moe_router@{i}"), (mlp.experts, f"moe_experts@{i}")]
        else:
            ranges += [(mlp, f"ffn@{i}")]
    return ranges


def _ranged(fn: Callable, name: str) -> Callable:
    def wrapper(*args, **kwargs):
        with record_function(COMP + name):
            return fn(*args, **kwargs)

    return wrapper


@contextmanager
def component_ranges(model: nn.Module) -> Iterator[None]:
    """Wrap each component's forward (and the embedding splice) in a named range; undo on exit."""
    missing = object()
    patched: list[tuple[object, str, object]] = []  # (object, attribute, instance value before)
    try:
        for obj, attr, name in [(m, "forward", n) for m, n in component_map(model)] + [(model, "embed_inputs", "embedding")]:
            patched.append((obj, attr, obj.__dict__.get(attr, missing)))
            setattr(obj, attr, _ranged(getattr(obj, attr), name))
        yield
    finally:
        for obj, attr, before in reversed(patched):
            if before is missing:
                del obj.__dict__[attr]  # back to the class attribute
            else:
                obj.__dict__[attr] = before
