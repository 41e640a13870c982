"""Analytic FLOPs per stage and component, from the architecture and a configuration's counts.

Convention: 2 FLOPs per multiply-add, matrix products only (norms, softmax, activations, RoPE and
residual adds are not counted). Attention is counted as computed: the ViT and the pooling attend over
all keys; prefill attention is causal (query i attends to i keys); a decode step attends to the cached
context plus itself. Every ViT layer runs (features come from two of them, but all 23 are computed);
the connector runs on every pooled feature, including those the prefill drops; prefill computes the
lm_head for the last position only; MoE layers count only the top-k experts of each token.
"""

from __future__ import annotations

from e1.model.arch import Arch
from e1.vlm import flops as vlm_flops


def vision_encoder(arch: Arch, crops: int) -> dict[str, int]:
    v = arch.vision
    d, m, layers, p = v["hidden_size"], v["intermediate_size"], v["num_layers"], v["patch_size"]
    patches = arch.patches_per_side**2
    t = patches + 1  # + CLS
    per_crop = {
        "patch_embed": 2 * patches * 3 * p * p * d,
        "attention_proj": 2 * layers * 4 * t * d * d,
        "attention_scores": 2 * layers * t * t * d,  # QK^T over all heads
        "attention_values": 2 * layers * t * t * d,
        "mlp": 2 * layers * 2 * t * d * m,
    }
    return {k: crops * n for k, n in per_crop.items()}


def projector(arch: Arch, pooled: int) -> dict[str, int]:
    c, fd, d_model = arch.connector, arch.feature_dim, arch.llm["hidden_size"]
    pd, h, win = c["pool_dim"], c["projector_hidden"], c["pool_size"] ** 2
    return {
        "pooling_proj": 2 * pooled * (fd * pd + 2 * win * fd * pd + pd * pd),  # q (mean), k and v (4 each), out
        "pooling_attention": 2 * 2 * pooled * win * pd,  # scores and weighted sum, 1 query x 4 keys
        "projector_mlp": 2 * pooled * (2 * pd * h + h * d_model),
    }


def _llm_layerwise(arch: Arch, tokens: int, attended: int) -> dict[str, int]:
    """LLM matmul FLOPs for `tokens` new positions whose attention touches `attended` (query, key) pairs."""
    a = arch.llm
    d, layers = a["hidden_size"], a["num_layers"]
    return {
        "attention_proj": 2 * layers * 4 * tokens * d * d,
        "attention_scores": 2 * layers * attended * d,
        "attention_values": 2 * layers * attended * d,
        "moe_router": 2 * layers * tokens * d * a["num_experts"],
        "moe_experts": 2 * layers * tokens * a["top_k"] * 3 * d * a["expert_intermediate"],
        "lm_head": 2 * d * a["vocab_size"],  # one position: the next token's logits
    }


def prefill(arch: Arch, prefill_tokens: int) -> dict[str, int]:
    t = prefill_tokens
    return _llm_layerwise(arch, t, t * (t + 1) // 2)  # causal: query i sees keys 1..i


def decode_step(arch: Arch, context: int) -> dict[str, int]:
    """One decode step whose cache already holds `context` positions (it attends to context + 1 keys)."""
    if arch.family != "molmoe":
        return vlm_flops.decode_step(arch, context)
    return _llm_layerwise(arch, 1, context + 1)


def stage_flops(arch: Arch, counts: dict) -> dict[str, dict[str, int]]:
    """Per stage: components and 'total'. counts: a layout's counts() and prefill_tokens (MolmoE: vit_crops,
    pooled_features, prefill_tokens); other families: e1.vlm.flops."""
    if arch.family != "molmoe":
        stages = {"vision_encoder": vlm_flops.vision_encoder(arch, counts),
                  "projector": vlm_flops.projector(arch, counts),
                  "prefill": vlm_flops.prefill(arch, counts["prefill_tokens"]),
                  "decode_step": vlm_flops.decode_step(arch, counts["prefill_tokens"])}
        return {name: {**parts, "total": sum(parts.values())} for name, parts in stages.items()}
    stages = {
        "vision_encoder": vision_encoder(arch, counts["vit_crops"]),
        "projector": projector(arch, counts["pooled_features"]),
        "prefill": prefill(arch, counts["prefill_tokens"]),
        "decode_step": decode_step(arch, counts["prefill_tokens"]),
    }
    return {name: {**parts, "total": sum(parts.values())} for name, parts in stages.items()}
