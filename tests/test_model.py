"""MolmoE model: stage shapes, KV-cache correctness, parameter counts, random weights, knobs.

Expected numbers are derived from /work/shared/spec/molmoe-1b.md (comments show the arithmetic).
CPU only; the full-size model is only ever built on the meta device.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from e1.model.arch import load_arch
from e1.model.build import build_model
from e1.model.preprocess import build_input_ids, preprocess

TINY = load_arch("molmoe-1b-tiny")
VOCAB = 50304  # lm_head outputs
EMBED_ROWS = 50304 + 128  # token table incl. the image special tokens
D_TINY = TINY.llm["hidden_size"]  # tiny LLM width


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("molmoe-1b-tiny", device="cpu", dtype="float32", seed=0)


@pytest.fixture(scope="module")
def full_meta():
    return build_model("molmoe-1b", device="meta", dtype="bfloat16")


def _image(w: int, h: int) -> Image.Image:
    rng = np.random.default_rng(1)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def tiny_inputs(tiny):
    """A 448x336 image (tiling (1,2): some padded/partial patches) through vision + connector."""
    pp = preprocess(TINY, _image(448, 336))
    with torch.no_grad():
        feats = tiny.encode_images(torch.from_numpy(pp.crops))
        emb = tiny.project(feats, torch.from_numpy(pp.patch_masks))
    text = [1234, 25, 3, 4567, 89, 25]  # stand-in for " User: {prompt} Assistant:"
    ids = torch.from_numpy(build_input_ids(TINY, pp.layout, text))[None]
    # With N(0, 0.02) random weights the connector's outputs are ~1e-6, far below the ~0.02 token
    # embeddings, so they would barely touch the logits. The LLM tests use O(1) image embeddings
    # instead (prefill accepts any (P, d) tensor) so that misplaced or dropped features are visible.
    rand_emb = torch.randn(emb.shape, generator=torch.Generator().manual_seed(7))
    return {
        "pp": pp,
        "feats": feats,
        "emb": emb,
        "rand_emb": rand_emb,
        "ids": ids,
        "fi": torch.from_numpy(pp.layout.feature_index),
        "tp": torch.from_numpy(pp.layout.token_position),
    }


# --- stage shapes --------------------------------------------------------------------------------

def test_stage_shapes(tiny, tiny_inputs):
    pp = tiny_inputs["pp"]
    # 448x336 (W x H): H-112 = 224, W-112 = 336; (1,1): min(1, 0.667) < 1; (1,2): min(1, 448/336) = 1 -> (1,2)
    assert pp.layout.tiling == (1, 2)
    n = 1 * 2 + 1  # tiles + global
    assert pp.crops.shape == (n, 3, 336, 336)
    # tiny ViT width 64, two feature layers -> 128 per patch; 24*24 = 576 patches (CLS dropped)
    assert tiny_inputs["feats"].shape == (n, 576, 2 * 64)
    # connector: 12x12 = 144 pooled per crop, projected to the tiny d_model
    assert tiny_inputs["emb"].shape == (n * 144, D_TINY)
    # prefill: logits of the last position over the 50304-way lm_head (not the 50432-row table)
    with torch.no_grad():
        logits, cache = tiny.prefill(tiny_inputs["ids"], tiny_inputs["emb"], tiny_inputs["fi"], tiny_inputs["tp"])
    T = tiny_inputs["ids"].shape[1]
    # T = BOS + image tokens + 6 text; image tokens = 158 + (1 + 12*(20+1) + 1) = 158 + 254 = 412
    # (R = (16+8)/2 = 12, C = (32+8)/2 = 20)
    assert T == 1 + 412 + 6
    assert logits.shape == (1, VOCAB)
    assert cache.get_seq_length() == T
    assert tiny.llm.embed_tokens.weight.shape == (EMBED_ROWS, D_TINY)
    assert tiny.lm_head.weight.shape == (VOCAB, D_TINY)


def test_vision_features_are_layer_outputs(tiny):
    """Features = outputs of layers feature_layers ([-2, -3] for tiny) concatenated, CLS dropped, no post-LN."""
    x = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = tiny.encode_images(x)
        h = tiny.vision.vit.pre_layrnorm(tiny.vision.vit.embeddings(x))
        outs = []
        for layer in tiny.vision.vit.encoder.layers:  # all 3 layers run
            h = layer(h, None)
            h = h[0] if isinstance(h, tuple) else h
            outs.append(h)
    assert len(outs) == TINY.vision["num_layers"] == 3
    want = torch.cat([outs[-2], outs[-3]], dim=-1)[:, 1:]
    torch.testing.assert_close(got, want)
    # the layer-2-from-last output differs from the last output (the right layers are picked)
    assert not torch.allclose(got[..., :64], outs[-1][:, 1:])


def test_connector_matches_reference(tiny):
    """Pad embedding (0: fully padded, 1: partial), 2x2 attention-meanq pooling, bias-free SwiGLU."""
    c = tiny.connector
    g = torch.Generator().manual_seed(5)
    n, d = 2, 128
    feats = torch.randn(n, 576, d, generator=g)
    masks = torch.ones(n, 576)
    masks[0, :30] = 0.0
    masks[0, 30:40] = 0.5
    masks[1, 100:120] = 3 / 14
    with torch.no_grad():
        got = tiny.project(feats, masks)
        x = feats.clone()
        x[masks == 0] += c.pad_embed[0]
        part = (masks > 0) & (masks < 1)
        x[part] += c.pad_embed[1]
        x = x.view(n, 24, 24, d)
        heads, hd = 4, 64 // 4
        p = c.pooling
        rows = []
        for k in range(n):
            for i in range(12):
                for j in range(12):
                    win = x[k, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(4, d)
                    q = p.wq(win.mean(0)).view(heads, hd)
                    kk = p.wk(win).view(4, heads, hd)
                    vv = p.wv(win).view(4, heads, hd)
                    att = torch.einsum("hd,whd->hw", q, kk) / hd**0.5
                    o = torch.einsum("hw,whd->hd", att.softmax(-1), vv).reshape(-1)
                    rows.append(p.wo(o))
        pooled = torch.stack(rows)
        pr = c.projector
        want = pr.w2(F.silu(pr.w1(pooled)) * pr.w3(pooled))
    assert got.shape == (n * 144, D_TINY)
    # random-init outputs are ~1e-6 in size: tolerance relative to their scale
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=1e-4)
    assert pr.w1.bias is None and pr.w2.bias is None and pr.w3.bias is None


def test_image_features_added_at_patch_positions(tiny, tiny_inputs):
    ids, emb, fi, tp = (tiny_inputs[k] for k in ("ids", "rand_emb", "fi", "tp"))
    table_before = tiny.llm.embed_tokens.weight.clone()
    with torch.no_grad():
        full = tiny.forward_logits(ids, emb, fi, tp)
        x = tiny.llm.embed_tokens(ids).clone()
        for f, pos in zip(fi.tolist(), tp.tolist()):
            x[0, pos] += emb[f]
        want = tiny.lm_head(tiny.llm(inputs_embeds=x, use_cache=False).last_hidden_state)
        no_img = tiny.forward_logits(ids, torch.zeros_like(emb), fi, tp)
    torch.testing.assert_close(full, want, atol=1e-4, rtol=1e-4)
    # image features change the output; the embedding table itself is never modified in place
    assert not torch.allclose(full[0, -1], no_img[0, -1])
    assert torch.equal(tiny.llm.embed_tokens.weight, table_before)


# --- KV cache: prefill + decode == one full forward --------------------------------------------------

def test_kv_cache_matches_full_forward(tiny, tiny_inputs):
    ids, emb, fi, tp = (tiny_inputs[k] for k in ("ids", "rand_emb", "fi", "tp"))
    T = ids.shape[1]
    n_new = 6  # one prefill (token 1) + 5 decode steps
    step_logits = []
    tokens = []
    with torch.no_grad():
        logits, cache = tiny.prefill(ids, emb, fi, tp)
        step_logits.append(logits[0])
        tok = logits.argmax(-1)
        tokens.append(int(tok))
        for _ in range(n_new - 1):
            logits, cache = tiny.decode_step(tok.view(1, 1), cache)
            step_logits.append(logits[0])
            tok = logits.argmax(-1)
            tokens.append(int(tok))
        # prefill T positions + n_new - 1 decoded ones
        assert cache.get_seq_length() == T + n_new - 1
        seq = torch.cat([ids, torch.tensor([tokens[:-1]], dtype=ids.dtype)], dim=1)
        full = tiny.forward_logits(seq, emb, fi, tp)
    assert full.shape == (1, T + n_new - 1, VOCAB)
    for k in range(n_new):
        # logits that produced token k+1 sit at position T-1+k of the full forward
        torch.testing.assert_close(step_logits[k], full[0, T - 1 + k], atol=1e-4, rtol=1e-4)
    assert tokens == full[0, T - 1 :].argmax(-1).tolist()
    # decode steps are not a no-op: successive logits differ
    assert not torch.allclose(step_logits[0], step_logits[1])


def test_eager_implementations_agree(tiny, tiny_inputs):
    """attn/experts implementations are kernel choices: same weights -> same logits."""
    eager = build_model("molmoe-1b-tiny", device="cpu", dtype="float32", seed=0,
                        attn_implementation="eager", experts_implementation="eager")
    ids, fi, tp = tiny_inputs["ids"], tiny_inputs["fi"], tiny_inputs["tp"]
    crops = torch.from_numpy(tiny_inputs["pp"].crops)
    masks = torch.from_numpy(tiny_inputs["pp"].patch_masks)
    emb = tiny_inputs["emb"]
    with torch.no_grad():
        feats_e = eager.encode_images(crops)
        emb_e = eager.project(feats_e, masks)
        logit_e, _ = eager.prefill(ids, tiny_inputs["rand_emb"], fi, tp)
        logit_s, _ = tiny.prefill(ids, tiny_inputs["rand_emb"], fi, tp)
    torch.testing.assert_close(feats_e, tiny_inputs["feats"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(emb_e, emb, atol=1e-4 * float(emb.abs().max()), rtol=1e-4)
    torch.testing.assert_close(logit_e, logit_s, atol=1e-4, rtol=1e-4)


def test_bfloat16_build():
    m = build_model("molmoe-1b-tiny", device="cpu", dtype="bfloat16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # build does not leak the default dtype


# --- parameter counts (full model on meta) -----------------------------------------------------------

def _vit_params() -> int:
    patch = 3 * 14 * 14 * 1024  # patch conv, no bias
    cls = 1024
    pos = 577 * 1024  # 24*24 + 1 positions
    pre_ln = 2 * 1024
    attn = 4 * (1024 * 1024 + 1024)  # q, k, v, out with bias
    mlp = (1024 * 4096 + 4096) + (4096 * 1024 + 1024)
    lns = 2 * 2 * 1024
    per_layer = attn + mlp + lns  # 4,198,400 + 8,393,728 + 4,096 = 12,596,224
    return patch + cls + pos + pre_ln + 23 * per_layer  # no post-LN, no projection head


def _connector_params() -> int:
    pad = 2 * 2048
    qkv = 3 * (2048 * 1024 + 1024)
    out = 1024 * 1024 + 1024
    projector = 1024 * 1024 * 2 + 1024 * 2048  # w1, w3: 1024->1024; w2: 1024->2048; no bias
    return pad + qkv + out + projector


EMBED = 50432 * 2048
INACTIVE = 16 * (64 - 8) * 3 * 2048 * 1024  # 16 layers x 56 unused experts x SwiGLU 2048->1024->2048


def _llm_params() -> int:
    attn = 4 * 2048 * 2048  # q, k, v, o, no bias, full MHA (16 kv heads)
    qk_norm = 2 * 2048  # RMSNorm over the full 2048-dim q and k
    norms = 2 * 2048
    router = 64 * 2048
    experts = 64 * 3 * 2048 * 1024
    per_layer = attn + qk_norm + norms + router + experts
    final_norm = 2048
    lm_head = 2048 * 50304
    return EMBED + 16 * per_layer + final_norm + lm_head


def test_param_counts_full(full_meta):
    pc = full_meta.param_counts()
    vit, conn, llm = _vit_params(), _connector_params(), _llm_params()
    assert vit == 290_909_184
    assert conn == 11_542_528
    assert llm == 6_919_424_000
    assert pc["vision_encoder"] == vit
    assert pc["projector"] == conn
    assert pc["llm"] == llm
    assert pc["total"] == vit + conn + llm
    assert abs(pc["total"] - 7.2e9) / 7.2e9 < 0.01  # "about 7.2B"
    assert pc["llm_active_per_token"] == llm - EMBED - INACTIVE
    # sanity vs the card's "about 1.5B active": LLM active (1.18B) + ViT + connector ~ 1.48B
    active_all = pc["llm_active_per_token"] + vit + conn
    assert 1.4e9 < active_all < 1.6e9
    # and the model really has that many parameters
    assert sum(p.numel() for p in full_meta.parameters()) == pc["total"]


def test_full_shapes(full_meta):
    m = full_meta
    assert all(p.device.type == "meta" for p in m.parameters())
    assert len(m.vision.vit.encoder.layers) == 23
    assert isinstance(m.vision.vit.post_layernorm, torch.nn.Identity)
    assert len(m.llm.layers) == 16
    att = m.llm.layers[0].self_attn
    assert att.q_proj.weight.shape == (2048, 2048) and att.q_proj.bias is None
    assert att.k_proj.weight.shape == (2048, 2048) and att.v_proj.weight.shape == (2048, 2048)
    assert att.q_norm.weight.shape == (2048,) and att.k_norm.weight.shape == (2048,)
    assert m.llm.layers[0].mlp.gate.weight.shape == (64, 2048)
    assert m.llm.embed_tokens.weight.shape == (50432, 2048)
    assert m.lm_head.weight.shape == (50304, 2048)
    assert m.lm_head.weight is not m.llm.embed_tokens.weight  # untied
    cfg = m.llm_config
    assert cfg.num_experts == 64 and cfg.num_experts_per_tok == 8 and cfg.norm_topk_prob is False
    assert cfg.num_key_value_heads == cfg.num_attention_heads == 16
    assert cfg.intermediate_size == 1024 and cfg.rms_norm_eps == 1e-5
    assert cfg.max_position_embeddings == 4096
    rope = getattr(cfg, "rope_parameters", None) or {"rope_theta": cfg.rope_theta}
    assert rope["rope_theta"] == 10000.0
    assert m.vision.vit.config.hidden_act == "quick_gelu"
    assert m.vision.vit.config.layer_norm_eps == 1e-5
    assert m.vision.feature_layers == [-2, -9]


# --- random weights ----------------------------------------------------------------------------------

def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_seeded_random_init(tiny):
    same = build_model("molmoe-1b-tiny", seed=0)
    assert _state_equal(tiny, same)
    other = build_model("molmoe-1b-tiny", seed=1)
    sa, sb = tiny.state_dict(), other.state_dict()
    assert not torch.equal(sa["lm_head.weight"], sb["lm_head.weight"])
    assert not torch.equal(sa["connector.pooling.wq.weight"], sb["connector.pooling.wq.weight"])
    # documented init: norms 1, biases 0, other weights N(0, 0.02)
    assert torch.all(sa["llm.norm.weight"] == 1)
    assert torch.all(sa["vision.vit.pre_layrnorm.bias"] == 0)
    assert torch.all(sa["connector.pooling.wq.bias"] == 0)
    assert abs(float(sa["lm_head.weight"].std()) - 0.02) < 0.001


# --- bad knobs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs,value,allowed",
    [
        ({"attn_implementation": "bogus"}, "bogus", ["sdpa", "eager", "flash_attention_2"]),
        ({"experts_implementation": "bogus"}, "bogus", ["grouped_mm", "batched_mm", "eager"]),
        ({"dtype": "int8"}, "int8", ["bfloat16", "float16", "float32"]),
    ],
)
def test_bad_knobs(kwargs, value, allowed):
    with pytest.raises(ValueError) as e:
        build_model("molmoe-1b-tiny", device="cpu", **kwargs)
    msg = str(e.value)
    assert value in msg
    for a in allowed:
        assert a in msg


def test_unknown_model_name():
    with pytest.raises(ValueError, match="molmoe-1b-tiny"):
        build_model("nope")
