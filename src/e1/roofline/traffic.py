"""Analytic device-memory traffic (bytes) per stage: weights read, KV cache, activations.

Convention: the fewest bytes a stage must move — every weight it uses is read once per stage call
(the ViT's 13 crops share one read), the KV cache is written once in prefill and read whole by every
decode step, and activations are counted where layers hand them on (each layer reads its input and
writes its output) plus the stage's own inputs and outputs. Prefill reads the experts that at least
one token routes to: the routing counts when given, otherwise the expected number of distinct experts
under uniform top-k routing, E * (1 - (1 - k/E)^T). Decode reads k experts per layer.
"""

from __future__ import annotations

from e1.model.arch import Arch
from e1.vlm import traffic as vlm_traffic


def _vit_weights(arch: Arch) -> int:
    v = arch.vision
    d, m, layers, p = v["hidden_size"], v["intermediate_size"], v["num_layers"], v["patch_size"]
    per_layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
    embed = 3 * p * p * d + d + (arch.patches_per_side**2 + 1) * d + 2 * d
    return embed + layers * per_layer


def _connector_weights(arch: Arch) -> int:
    c, fd, d_model = arch.connector, arch.feature_dim, arch.llm["hidden_size"]
    pd, h = c["pool_dim"], c["projector_hidden"]
    return 2 * fd + 3 * (fd * pd + pd) + pd * pd + pd + 2 * pd * h + h * d_model


def _llm_dense_per_layer(arch: Arch) -> int:
    """Attention, QK-norm, both RMSNorms and the router of one layer (experts excluded)."""
    a = arch.llm
    d = a["hidden_size"]
    return 4 * d * d + 4 * d + a["num_experts"] * d


def _expert_params(arch: Arch) -> int:
    return 3 * arch.llm["hidden_size"] * arch.llm["expert_intermediate"]


def expected_experts_hit(arch: Arch, tokens: int) -> float:
    """Distinct experts per layer that `tokens` tokens reach under uniform top-k routing."""
    e, k = arch.llm["num_experts"], arch.llm["top_k"]
    return e * (1 - (1 - k / e) ** tokens)


def stage_bytes(arch: Arch, counts: dict, dtype_bytes: int = 2,
                experts_hit_per_layer: list[int] | None = None) -> dict[str, dict[str, float]]:
    """Per stage: weights, kv_cache, activations and total bytes. counts as for e1.roofline.flops.stage_flops;
    other families than MolmoE: e1.vlm.traffic."""
    if arch.family != "molmoe":
        return vlm_traffic.stage_bytes(arch, counts, dtype_bytes, experts_hit_per_layer)
    a, v = arch.llm, arch.vision
    d, layers, b = a["hidden_size"], a["num_layers"], dtype_bytes
    crops, pooled, t = counts["vit_crops"], counts["pooled_features"], counts["prefill_tokens"]
    vit_tokens = crops * (arch.patches_per_side**2 + 1)
    image_px = crops * 3 * v["image_size"] ** 2
    features = crops * arch.patches_per_side**2 * arch.feature_dim
    head = d * a["vocab_size"] + d  # lm_head + final norm
    if experts_hit_per_layer is None:
        hit = layers * expected_experts_hit(arch, t)
    else:
        hit = float(sum(experts_hit_per_layer))
    kv_per_token = 2 * layers * d  # keys and values of every layer
    stages = {
        "vision_encoder": {
            "weights": _vit_weights(arch) * b,
            "kv_cache": 0,
            "activations": (image_px + 2 * v["num_layers"] * vit_tokens * v["hidden_size"] + features) * b,
        },
        "projector": {
            "weights": _connector_weights(arch) * b,
            "kv_cache": 0,
            "activations": (features + crops * arch.patches_per_side**2 + pooled * d) * b,
        },
        "prefill": {
            "weights": (layers * _llm_dense_per_layer(arch) + hit * _expert_params(arch) + t * d + head) * b,
            "kv_cache": t * kv_per_token * b,  # written
            "activations": (pooled * d + 2 * layers * t * d) * b,
        },
        "decode_step": decode_step(arch, t, dtype_bytes),
    }
    return {name: {**parts, "total": sum(parts.values())} for name, parts in stages.items()}


def decode_step(arch: Arch, context: int, dtype_bytes: int = 2) -> dict[str, int]:
    """One decode step whose cache already holds `context` positions: weights, kv_cache, activations."""
    if arch.family != "molmoe":
        return vlm_traffic.decode_step(arch, context, dtype_bytes)
    a = arch.llm
    d, layers, b = a["hidden_size"], a["num_layers"], dtype_bytes
    head = d * a["vocab_size"] + d  # lm_head + final norm
    return {
        "weights": (layers * (_llm_dense_per_layer(arch) + a["top_k"] * _expert_params(arch)) + d + head) * b,
        "kv_cache": (context + 1) * 2 * layers * d * b,  # read the context (K and V of every layer), write one
        "activations": 2 * layers * d * b,
    }
