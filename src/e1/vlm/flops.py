"""Analytic FLOPs per stage and component of the transformers-based VLMs (the convention of e1.roofline.flops:
2 FLOPs per multiply-add, matrix products only, attention counted as computed).

Vision: every encoder layer runs (LLaVA's whole CLIP tower, though layer -2 is used). Qwen2.5-VL's windowed
layers attend within windows of 4 x 4 merged units (8 x 8 patches; edge windows smaller), its full layers over
the whole image. Projector: LLaVA's two-layer MLP on 576 features; Qwen's merger (and Qwen3-VL's three deepstack
mergers) on patches / 4 features. LLM: grouped-query attention (scores and values over all query heads), a
gated MLP of three matrices, or a router and the top-k experts of each token; prefill computes the lm_head for
the last position only; a decode step attends to the cached context plus itself.
"""

from __future__ import annotations

from e1.model.arch import Arch


def _vit(arch: Arch, tokens: int, attended: int, patch_in: int, gated: bool) -> dict[str, int]:
    v = arch.vision
    d, m = v["hidden_size"], v["intermediate_size"]
    layers = v.get("num_layers", v.get("depth"))
    patches = tokens - (1 if arch.family == "llava" else 0)  # CLS has no patch
    return {
        "patch_embed": 2 * patches * patch_in * d,
        "attention_proj": 2 * layers * 4 * tokens * d * d,
        "attention_scores": 2 * attended * d,
        "attention_values": 2 * attended * d,
        "mlp": 2 * layers * (3 if gated else 2) * tokens * d * m,
    }


def window_pairs(arch: Arch, rows: int, cols: int) -> int:
    """(query, key) pairs of one windowed Qwen2.5-VL layer over a rows x cols patch grid."""
    v = arch.vision
    merge = v["spatial_merge_size"]
    side = v["window_size"] // merge // v["patch_size"]  # merged units per window side (4)

    def chunks(n: int) -> list[int]:
        return [side] * (n // side) + ([n % side] if n % side else [])

    return sum((a * b * merge * merge) ** 2 for a in chunks(rows // merge) for b in chunks(cols // merge))


def vision_encoder(arch: Arch, counts: dict) -> dict[str, int]:
    v = arch.vision
    n = counts["vit_tokens"]
    if arch.family == "llava":
        return _vit(arch, n, v["num_layers"] * n * n, 3 * v["patch_size"] ** 2, gated=False)
    patch_in = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    if arch.family == "qwen2_5_vl":
        full = len(v["fullatt_block_indexes"])
        pairs = full * n * n + (v["depth"] - full) * window_pairs(arch, *counts["patch_grid"])
        return _vit(arch, n, pairs, patch_in, gated=True)
    return _vit(arch, n, v["depth"] * n * n, patch_in, gated=False)


def projector(arch: Arch, counts: dict) -> dict[str, int]:
    v, d_model, f = arch.vision, arch.llm["hidden_size"], counts["pooled_features"]
    if arch.family == "llava":
        return {"projector_mlp": 2 * f * (v["hidden_size"] * d_model + d_model * d_model)}
    wide = v["hidden_size"] * v["spatial_merge_size"] ** 2
    merger = 2 * f * (wide * wide + wide * v["out_hidden_size"])
    parts = {"projector_mlp": merger}
    if arch.family == "qwen3_vl_moe":
        parts["deepstack_mlp"] = len(v["deepstack_visual_indexes"]) * merger
    return parts


def _llm(arch: Arch, tokens: int, attended: int) -> dict[str, int]:
    a = arch.llm
    d, layers = a["hidden_size"], a["num_layers"]
    hd = a.get("head_dim", d // a["num_heads"])
    q, kv = a["num_heads"] * hd, a["num_kv_heads"] * hd
    parts = {
        "attention_proj": 2 * layers * tokens * (d * q + 2 * d * kv + q * d),
        "attention_scores": 2 * layers * attended * q,
        "attention_values": 2 * layers * attended * q,
    }
    if "num_experts" in a:
        parts["moe_router"] = 2 * layers * tokens * d * a["num_experts"]
        parts["moe_experts"] = 2 * layers * tokens * a["top_k"] * 3 * d * a["expert_intermediate"]
    else:
        parts["mlp"] = 2 * layers * tokens * 3 * d * a["intermediate_size"]
    parts["lm_head"] = 2 * d * a["vocab_size"]
    return parts


def prefill(arch: Arch, prefill_tokens: int) -> dict[str, int]:
    t = prefill_tokens
    return _llm(arch, t, t * (t + 1) // 2)


def decode_step(arch: Arch, context: int) -> dict[str, int]:
    return _llm(arch, 1, context + 1)
