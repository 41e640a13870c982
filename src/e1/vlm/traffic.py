"""Analytic parameters and device-memory traffic (bytes) per stage of the transformers-based VLMs, with the
convention of e1.roofline.traffic: every weight a stage uses is read once per stage call, the KV cache is written
once in prefill and read whole by every decode step, activations are counted where layers hand them on (each
layer reads its input and writes its output) plus the stage's inputs and outputs. Prefill reads the experts at
least one token routes to (the measured count when given, else the uniform-routing expectation); a decode step
reads top-k experts per layer. Parameter counts equal the meta-device builds' (tests/test_vlm.py).
"""

from __future__ import annotations

from e1.model.arch import Arch


def vision_params(arch: Arch) -> int:
    v = arch.vision
    d, m, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    if arch.family == "llava":
        n = (v["image_size"] // p) ** 2 + 1
        layer = 4 * (d * d + d) + (d * m + m) + (m * d + d) + 4 * d
        return 3 * p * p * d + d + n * d + 4 * d + v["num_layers"] * layer
    patch = 3 * v["temporal_patch_size"] * p * p * d
    if arch.family == "qwen2_5_vl":
        layer = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * (d * m + m) + (m * d + d)
        return patch + v["depth"] * layer
    layer = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    return patch + d + v["num_position_embeddings"] * d + v["depth"] * layer


def projector_params(arch: Arch) -> int:
    v, dt = arch.vision, arch.llm["hidden_size"]
    if arch.family == "llava":
        return (v["hidden_size"] * dt + dt) + (dt * dt + dt)
    d = v["hidden_size"]
    wide, out = d * v["spatial_merge_size"] ** 2, v["out_hidden_size"]
    mlp = (wide * wide + wide) + (wide * out + out)
    if arch.family == "qwen2_5_vl":
        return d + mlp
    deep = len(v["deepstack_visual_indexes"])
    return (2 * d + mlp) + deep * (2 * wide + mlp)


def _llm_dense_per_layer(arch: Arch) -> int:
    """Attention (and Qwen's biases, Qwen3's QK-norm), both norms, the router or the dense MLP; experts excluded."""
    a = arch.llm
    d = a["hidden_size"]
    hd = a.get("head_dim", d // a["num_heads"])
    q, kv = a["num_heads"] * hd, a["num_kv_heads"] * hd
    attn = d * q + 2 * d * kv + q * d
    if arch.family == "qwen2_5_vl":
        attn += q + 2 * kv
    if arch.family == "qwen3_vl_moe":
        attn += 2 * hd
    ffn = a["num_experts"] * d if "num_experts" in a else 3 * d * a["intermediate_size"]
    return attn + 2 * d + ffn


def expert_params(arch: Arch) -> int:
    return 3 * arch.llm["hidden_size"] * arch.llm["expert_intermediate"] if "num_experts" in arch.llm else 0


def llm_params(arch: Arch) -> int:
    a = arch.llm
    d = a["hidden_size"]
    experts = a.get("num_experts", 0) * expert_params(arch)
    return a["num_layers"] * (_llm_dense_per_layer(arch) + experts) + 2 * d * a["vocab_size"] + d


def _expected_hit(arch: Arch, tokens: int) -> float:
    e, k = arch.llm["num_experts"], arch.llm["top_k"]
    return e * (1 - (1 - k / e) ** tokens)


def stage_bytes(arch: Arch, counts: dict, dtype_bytes: int = 2,
                experts_hit_per_layer: list[int] | None = None) -> dict[str, dict[str, float]]:
    a, v, b = arch.llm, arch.vision, dtype_bytes
    d, layers = a["hidden_size"], a["num_layers"]
    t, n, f = counts["prefill_tokens"], counts["vit_tokens"], counts["pooled_features"]
    depth = v.get("num_layers", v.get("depth"))
    pixels = 3 * n * v["patch_size"] ** 2 * v.get("temporal_patch_size", 1)
    features = n * v["hidden_size"]
    head = d * a["vocab_size"] + d
    if "num_experts" not in a:
        hit = 0.0
    elif experts_hit_per_layer is None:
        hit = layers * _expected_hit(arch, t)
    else:
        hit = float(sum(experts_hit_per_layer))
    hd = a.get("head_dim", d // a["num_heads"])
    kv_per_token = 2 * layers * a["num_kv_heads"] * hd
    stages = {
        "vision_encoder": {"weights": vision_params(arch) * b, "kv_cache": 0,
                           "activations": (pixels + 2 * depth * features + features) * b},
        "projector": {"weights": projector_params(arch) * b, "kv_cache": 0,
                      "activations": (features + f * d) * b},
        "prefill": {"weights": (layers * _llm_dense_per_layer(arch) + hit * expert_params(arch) + t * d + head) * b,
                    "kv_cache": t * kv_per_token * b, "activations": (f * d + 2 * layers * t * d) * b},
        "decode_step": decode_step(arch, t, dtype_bytes),
    }
    return {name: {**parts, "total": sum(parts.values())} for name, parts in stages.items()}


def decode_step(arch: Arch, context: int, dtype_bytes: int = 2) -> dict[str, int]:
    a, b = arch.llm, dtype_bytes
    d, layers = a["hidden_size"], a["num_layers"]
    hd = a.get("head_dim", d // a["num_heads"])
    experts = a.get("top_k", 0) * expert_params(arch)
    return {"weights": (layers * (_llm_dense_per_layer(arch) + experts) + d + d * a["vocab_size"] + d) * b,
            "kv_cache": (context + 1) * 2 * layers * a["num_kv_heads"] * hd * b,
            "activations": 2 * layers * d * b}
