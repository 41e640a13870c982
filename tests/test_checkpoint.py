"""The released MolmoE checkpoint layout: loading, writing, and every error a bad folder gives.

The released names and shapes are those of the reference modeling code (modeling_molmoe.py of
allenai/MolmoE-1B-0924). The tests write checkpoints in that layout themselves (no download is possible
here): tensors with distinct random values, several shards and an index, then check every e1 parameter
against the tensor it must come from, stated here independently of e1.model.checkpoint's mapping.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from e1.model.arch import load_arch
from e1.model.build import build_model
from e1.model.checkpoint import INDEX_FILE, plan, released_config, released_shapes, save_released

TINY = load_arch("molmoe-1b-tiny")
FULL = load_arch("molmoe-1b")


def write_released(directory: Path, tensors: dict[str, torch.Tensor], shards: int, config: dict | None = None) -> Path:
    """A released-layout folder written by the test: `shards` safetensors files, an index, config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = names[k * per:(k + 1) * per]
        save_file({n: tensors[n] for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config or released_config(TINY)))
    return directory


@pytest.fixture(scope="module")
def released():
    """Distinct random values for every released tensor of the tiny architecture."""
    g = torch.Generator().manual_seed(7)
    return {n: torch.randn(s, generator=g) for n, s in released_shapes(TINY).items()}


@pytest.fixture
def folder(tmp_path, released):
    return write_released(tmp_path / "ckpt", released, shards=3)


def expected_e1(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every e1 parameter of the tiny model, from released tensors, by the reference code's structure."""
    v, llm = TINY.vision, TINY.llm
    w, p, d, inter = v["hidden_size"], v["patch_size"], llm["hidden_size"], llm["expert_intermediate"]
    vit, vb, tr = "model.vision_backbone.image_vit.", "model.vision_backbone.", "model.transformer."
    out = {
        "vision.vit.embeddings.class_embedding": r[vit + "class_embedding"],
        "vision.vit.embeddings.position_embedding.weight": r[vit + "positional_embedding"],
        # Linear over patches flattened as (row, col, channel) -> conv weight (out, channel, row, col)
        "vision.vit.embeddings.patch_embedding.weight": r[vit + "patch_embedding.weight"].view(w, p, p, 3)
        .permute(0, 3, 1, 2),
        "vision.vit.pre_layrnorm.weight": r[vit + "pre_ln.weight"],
        "vision.vit.pre_layrnorm.bias": r[vit + "pre_ln.bias"],
        "connector.pad_embed": r[vb + "pad_embed"],
        "llm.embed_tokens.weight": torch.cat([r[tr + "wte.embedding"], r[tr + "wte.new_embedding"]]),
        "llm.norm.weight": r[tr + "ln_f.weight"],
        "lm_head.weight": r["lm_head.weight"],
    }
    for k in range(v["num_layers"]):
        src, dst = vit + f"transformer.resblocks.{k}.", f"vision.vit.encoder.layers.{k}."
        for ours, theirs in (("attention.wq", "self_attn.q_proj"), ("attention.wk", "self_attn.k_proj"),
                             ("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.out_proj"),
                             ("feed_forward.w1", "mlp.fc1"), ("feed_forward.w2", "mlp.fc2"),
                             ("attention_norm", "layer_norm1"), ("ffn_norm", "layer_norm2")):
            for leaf in ("weight", "bias"):
                out[dst + f"{theirs}.{leaf}"] = r[src + f"{ours}.{leaf}"]
    for name in ("wq", "wk", "wv", "wo"):
        for leaf in ("weight", "bias"):
            out[f"connector.pooling.{name}.{leaf}"] = r[vb + f"image_pooling_2d.{name}.{leaf}"]
    for name in ("w1", "w2", "w3"):
        out[f"connector.projector.{name}.weight"] = r[vb + f"image_projector.{name}.weight"]
    for i in range(llm["num_layers"]):
        src, dst = tr + f"blocks.{i}.", f"llm.layers.{i}."
        qkv = r[src + "attn.att_proj.weight"]
        out[dst + "self_attn.q_proj.weight"] = qkv[:d]
        out[dst + "self_attn.k_proj.weight"] = qkv[d:2 * d]
        out[dst + "self_attn.v_proj.weight"] = qkv[2 * d:]
        out[dst + "self_attn.o_proj.weight"] = r[src + "attn.attn_out.weight"]
        out[dst + "self_attn.q_norm.weight"] = r[src + "attn.q_norm.weight"]
        out[dst + "self_attn.k_norm.weight"] = r[src + "attn.k_norm.weight"]
        out[dst + "input_layernorm.weight"] = r[src + "attn.attn_norm.weight"]
        out[dst + "post_attention_layernorm.weight"] = r[src + "mlp.ff_norm.weight"]
        out[dst + "mlp.gate.weight"] = r[src + "mlp.gate.weight"]
        experts = range(llm["num_experts"])
        out[dst + "mlp.experts.gate_up_proj"] = torch.stack([torch.cat(
            [r[src + f"mlp.experts.{j}.gate_proj.weight"], r[src + f"mlp.experts.{j}.up_proj.weight"]]) for j in experts])
        out[dst + "mlp.experts.down_proj"] = torch.stack([r[src + f"mlp.experts.{j}.down_proj.weight"] for j in experts])
        assert out[dst + "mlp.experts.gate_up_proj"].shape == (llm["num_experts"], 2 * inter, d)
    return out


# --- loading ------------------------------------------------------------------------------------------

def test_loads_every_tensor(folder, released):
    model = build_model("molmoe-1b-tiny", weights=str(folder))
    want = expected_e1(released)
    params = dict(model.named_parameters())
    assert set(want) == set(params)  # every e1 parameter has its source
    for name, p in params.items():
        assert torch.equal(p, want[name]), name
    rep = model.weights_report
    assert rep["tensors"] == len(released) == 131 and rep["layout"].endswith("3 shards)")
    assert rep["parameters"] == sum(p.numel() for p in params.values())
    assert rep["largest_shard_gib"] > 0 and rep["host_peak_above_start_gib"] is not None


def test_loads_in_run_dtype(folder, released):
    model = build_model("molmoe-1b-tiny", dtype="bfloat16", weights=str(folder))
    want = expected_e1(released)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, want[name].to(torch.bfloat16)), name


def test_single_file_layout(tmp_path, released):
    d = tmp_path / "one"
    d.mkdir()
    save_file(released, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(released_config(TINY)))
    model = build_model("molmoe-1b-tiny", weights=str(d))
    assert torch.equal(model.lm_head.weight, released["lm_head.weight"])
    assert model.weights_report["layout"] == "released MolmoE (config.json + model.safetensors)"


@torch.no_grad()
def test_expert_gate_up_order_and_formula(folder, released):
    """Each released expert computes down(silu(gate x) * up x) (the reference MolmoeMLP); e1's fused
    experts give the same output for tokens routed to it."""
    model = build_model("molmoe-1b-tiny", weights=str(folder))
    experts = model.llm.layers[1].mlp.experts
    x = torch.randn(5, TINY.llm["hidden_size"], generator=torch.Generator().manual_seed(1))
    j = 3
    src = f"model.transformer.blocks.1.mlp.experts.{j}."
    want = F.linear(F.silu(F.linear(x, released[src + "gate_proj.weight"])) * F.linear(x, released[src + "up_proj.weight"]),
                    released[src + "down_proj.weight"])
    top_k = TINY.llm["top_k"]
    index = torch.full((5, top_k), j)
    weights = torch.zeros(5, top_k)
    weights[:, 0] = 1.0  # slot 0 carries expert j with weight 1, the other slots weight 0
    got = experts(x, index, weights)
    torch.testing.assert_close(got, want)


@torch.no_grad()
def test_patch_embedding_matches_released_linear(folder, released):
    """The conv over a crop equals the released Linear over patches flattened as (row, col, channel)."""
    model = build_model("molmoe-1b-tiny", weights=str(folder))
    crop = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(2))
    got = model.vision.vit.embeddings.patch_embedding(crop).flatten(2).transpose(1, 2)  # (1, 576, w)
    patches = crop[0].permute(1, 2, 0).reshape(24, 14, 24, 14, 3).permute(0, 2, 1, 3, 4).reshape(576, 14 * 14 * 3)
    want = patches @ released["model.vision_backbone.image_vit.patch_embedding.weight"].T
    torch.testing.assert_close(got[0], want, atol=1e-4, rtol=1e-4)


# --- round trips --------------------------------------------------------------------------------------

def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_roundtrip_e1_released_e1(tmp_path, dtype):
    model = build_model("molmoe-1b-tiny", dtype=dtype, seed=4)
    out = save_released(model, tmp_path / "rt", max_shard_bytes=1_000_000)
    assert (out / INDEX_FILE).is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    assert _same_state(model, build_model("molmoe-1b-tiny", dtype=dtype, weights=str(out)))


def test_roundtrip_released_e1_released(folder, released, tmp_path):
    model = build_model("molmoe-1b-tiny", weights=str(folder))
    out = save_released(model, tmp_path / "again")  # one file: the tiny model fits a shard
    again = load_file(str(out / "model.safetensors"))
    assert again.keys() == released.keys() and all(torch.equal(again[k], released[k]) for k in released)
    assert not (out / INDEX_FILE).exists()


# --- the full model, on the meta device ------------------------------------------------------------------

def test_full_model_names_and_shapes():
    shapes = released_shapes(FULL)
    assert len(shapes) == 3573  # 373 ViT + 12 connector + 3187 LLM + lm_head
    assert sum(math.prod(s) for s in shapes.values()) == 7_221_875_712
    spot = {  # from the reference modeling code's module definitions
        "model.transformer.wte.embedding": (50304, 2048),
        "model.transformer.wte.new_embedding": (128, 2048),
        "model.transformer.blocks.15.attn.att_proj.weight": (6144, 2048),
        "model.transformer.blocks.0.attn.q_norm.weight": (2048,),
        "model.transformer.blocks.0.mlp.gate.weight": (64, 2048),
        "model.transformer.blocks.0.mlp.experts.63.gate_proj.weight": (1024, 2048),
        "model.transformer.blocks.0.mlp.experts.0.down_proj.weight": (2048, 1024),
        "model.vision_backbone.image_vit.patch_embedding.weight": (1024, 588),
        "model.vision_backbone.image_vit.positional_embedding": (577, 1024),
        "model.vision_backbone.image_vit.transformer.resblocks.22.feed_forward.w1.weight": (4096, 1024),
        "model.vision_backbone.image_pooling_2d.wq.weight": (1024, 2048),
        "model.vision_backbone.image_projector.w2.weight": (2048, 1024),
        "model.vision_backbone.pad_embed": (2, 2048),
        "lm_head.weight": (50304, 2048),
    }
    assert {k: shapes[k] for k in spot} == spot
    assert "model.vision_backbone.image_vit.transformer.resblocks.23.attention.wq.weight" not in shapes  # 23 layers
    meta = build_model("molmoe-1b", device="meta", dtype="bfloat16")
    by_source = plan(meta)  # every region's shape checked, every parameter covered exactly once
    assert set(by_source) == set(shapes)
    assert sum(p.numel() for p in meta.parameters()) == 7_221_875_712


def test_full_config_matches_the_released_one():
    """The values e1 checks, as in the released config.json (d_model 2048, mlp_ratio 1 -> experts of 1024)."""
    released = {**released_config(FULL), "mlp_hidden_size": None, "mlp_ratio": 1, "n_kv_heads": None}
    from e1.model.checkpoint import check_config
    check_config(released, FULL, "config.json")  # no error
    assert released_config(FULL)["vision_backbone"]["image_num_pos"] == 577


# --- errors -------------------------------------------------------------------------------------------

def _load_error(folder: Path) -> str:
    with pytest.raises(ValueError) as e:
        build_model("molmoe-1b-tiny", weights=str(folder))
    return str(e.value)


def test_missing_and_unexpected_tensors(tmp_path, released):
    gone = sorted(released)[:7]
    tensors = {k: v for k, v in released.items() if k not in gone}
    tensors["model.transformer.blocks.0.attn.bogus"] = torch.zeros(3)
    msg = _load_error(write_released(tmp_path / "c", tensors, shards=2))
    assert "7 missing tensors" in msg and all(n in msg for n in gone[:5]) and "... and 2 more" in msg
    assert "1 unexpected tensors: model.transformer.blocks.0.attn.bogus" in msg


def test_shape_mismatch(tmp_path, released):
    name = "model.transformer.blocks.1.attn.att_proj.weight"
    tensors = {**released, name: torch.zeros(100, 64)}
    msg = _load_error(write_released(tmp_path / "c", tensors, shards=2))
    assert f"{name} expected (192, 64) found (100, 64)" in msg


def test_truncated_shard(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    msg = _load_error(folder)
    assert str(shard) in msg and "truncated" in msg


def test_garbage_shard(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(b"not a safetensors file at all")
    assert str(shard) in _load_error(folder)


def test_shard_listed_but_absent(folder):
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    shard.unlink()
    msg = _load_error(folder)
    assert str(shard) in msg and "missing" in msg


def test_index_names_a_tensor_its_shard_lacks(folder):
    index = json.loads((folder / INDEX_FILE).read_text())
    index["weight_map"]["model.transformer.extra"] = sorted(set(index["weight_map"].values()))[0]
    (folder / INDEX_FILE).write_text(json.dumps(index))
    msg = _load_error(folder)
    assert "lists tensors its shards do not hold" in msg and "model.transformer.extra" in msg


def test_broken_index(folder):
    (folder / INDEX_FILE).write_text("{ not json")
    assert INDEX_FILE in _load_error(folder)


@pytest.mark.parametrize("key, value, words", [
    ("model_type", "llava", "model_type is 'llava', expected 'molmo'"),
    ("d_model", 128, "d_model is 128, molmoe-1b-tiny has 64"),
    ("moe_num_experts", 64, "moe_num_experts is 64, molmoe-1b-tiny has 8"),
    ("vision_backbone", {**released_config(TINY)["vision_backbone"], "image_num_layers": 23},
     "vision_backbone.image_num_layers is 23, molmoe-1b-tiny has 3"),
])
def test_config_mismatch_names_key_and_values(folder, key, value, words):
    cfg = {**released_config(TINY), key: value}
    (folder / "config.json").write_text(json.dumps(cfg))
    assert words in _load_error(folder)


def test_full_checkpoint_for_tiny_model(folder):
    (folder / "config.json").write_text(json.dumps(released_config(FULL)))
    msg = _load_error(folder)
    assert "d_model is 2048, molmoe-1b-tiny has 64" in msg and "n_layers is 16, molmoe-1b-tiny has 2" in msg


def test_config_not_json(folder):
    (folder / "config.json").write_text("{")
    assert "config.json" in _load_error(folder) and "JSON" in _load_error(folder)


@pytest.mark.parametrize("setup, words", [
    (lambda d: None, "no such directory"),
    (lambda d: d.mkdir(), "it has no config.json"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text(json.dumps(released_config(TINY)))),
     "neither model.safetensors.index.json nor model.safetensors"),
])
def test_not_a_checkpoint(tmp_path, setup, words):
    d = tmp_path / "x"
    setup(d)
    msg = _load_error(d)
    assert words in msg and "released MolmoE layout" in msg and str(d) in msg
