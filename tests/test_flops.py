"""Analytic FLOPs against torch's FlopCounterMode on the same stage calls (tiny model, CPU)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from e1.roofline import flops
from e1.model.arch import load_arch
from e1.describe import describe
from e1.inputs.images import synthetic_image
from e1.inputs.prompts import make_prompt
from e1.model.stage_inputs import prepare
from e1.model.build import build_model

ARCH = load_arch("molmoe-1b-tiny")


def counted(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.fixture(scope="module")
def eager():
    """Eager attention and eager experts: every matmul is a plain op FlopCounterMode knows."""
    return build_model(ARCH, attn_implementation="eager", experts_implementation="eager")


@pytest.fixture(scope="module")
def staged(eager):
    text_ids = make_prompt(ARCH, "short", 16, None, None)["text_ids"]
    inp, layout = prepare(ARCH, synthetic_image(560, 336), text_ids, torch.device("cpu"), torch.float32)
    return inp, layout


@torch.inference_mode()
def test_vision_and_projector_match_the_counter(eager, staged):
    inp, layout = staged
    got_v = counted(lambda: eager.encode_images(inp.crops))
    assert got_v == sum(flops.vision_encoder(ARCH, layout.vit_crops).values())
    feats = eager.encode_images(inp.crops)
    got_p = counted(lambda: eager.project(feats, inp.patch_masks))
    assert got_p == sum(flops.projector(ARCH, layout.pooled_features).values())


@torch.inference_mode()
def test_prefill_and_decode_match_the_counter(eager, staged):
    inp, _ = staged
    feats = eager.encode_images(inp.crops)
    embeds = eager.project(feats, inp.patch_masks)
    t = inp.input_ids.shape[1]
    got = counted(lambda: eager.prefill(inp.input_ids, embeds, inp.feature_index, inp.token_position))
    want = flops.prefill(ARCH, t)
    # eager attention computes the full T x T score matrix and masks it; we count the causal half
    d, layers = ARCH.llm["hidden_size"], ARCH.llm["num_layers"]
    full_attention = 2 * 2 * layers * t * t * d
    assert got == sum(want.values()) - want["attention_scores"] - want["attention_values"] + full_attention
    _, cache = eager.prefill(inp.input_ids, embeds, inp.feature_index, inp.token_position)
    token = torch.tensor([[7]])
    got_step = counted(lambda: eager.decode_step(token, cache))
    assert got_step == sum(flops.decode_step(ARCH, t).values())  # one query over t cached + itself


def test_full_model_numbers_by_hand():
    arch = load_arch("molmoe-1b")
    # one decode step at context 1220: attention projections 16*4*2048^2*2 = 536,870,912;
    # scores and values 2 * 16*1221*2048*2 = 160,038,912; router 16*2048*64*2 = 4,194,304;
    # experts 16*8*3*2048*1024*2 = 1,610,612,736; lm_head 2048*50304*2 = 206,045,184
    step = flops.decode_step(arch, 1220)
    assert sum(step.values()) == 536_870_912 + 160_038_912 + 4_194_304 + 1_610_612_736 + 206_045_184
    # which is about 2 x the active parameters read per token (1.179 B) plus the attention over the context
    assert sum(step.values()) - 160_038_912 == 2 * (1_178_994_688 - 16 * 4 * 2048 - 2048)  # norms excluded


def test_describe_reports_stage_flops():
    d = describe("molmoe-1b", "1008x784", 20)
    f = d["flops"]
    assert set(f) == {"vision_encoder", "projector", "prefill", "decode_step"}
    assert f["vision_encoder"]["total"] == sum(flops.vision_encoder(load_arch("molmoe-1b"), 13).values())
    assert f["decode_step"]["attention_scores"] == 2 * 16 * (1221 + 1) * 2048
    # 13 crops x 577 tokens through the 0.29 B-parameter ViT outweigh 1221 tokens through 1.18 B active LLM
    # parameters: at 1008x784 the vision encoder has more FLOPs than the prefill (yet runs faster on the H200)
    assert f["vision_encoder"]["total"] > f["prefill"]["total"] > f["decode_step"]["total"]


# --- bytes --------------------------------------------------------------------------------------------

def test_weight_bytes_match_parameter_counts():
    """Weights read per stage equal the parameters that stage uses (from the model on the meta device)."""
    from e1.roofline import traffic
    from e1.describe import param_counts

    arch = load_arch("molmoe-1b")
    p = param_counts(arch)
    d, t = 2048, 1221
    counts = {"vit_crops": 13, "pooled_features": 1872, "prefill_tokens": t}
    by = traffic.stage_bytes(arch, counts, dtype_bytes=2)
    assert by["vision_encoder"]["weights"] == 2 * p["vision_encoder"]
    assert by["projector"]["weights"] == 2 * p["projector"]
    # decode reads the active parameters plus one embedding row
    assert by["decode_step"]["weights"] == 2 * (p["llm_active_per_token"] + d)
    # every expert hit: all LLM parameters except the unused embedding rows
    all_hit = traffic.stage_bytes(arch, counts, 2, experts_hit_per_layer=[64] * 16)
    assert all_hit["prefill"]["weights"] == 2 * (p["llm"] - 50432 * d + t * d)
    # KV cache: 16 layers x (K + V) x 2048 x 2 bytes per position
    assert by["prefill"]["kv_cache"] == t * 16 * 2 * d * 2
    assert by["decode_step"]["kv_cache"] == (t + 1) * 16 * 2 * d * 2
    # 1221 tokens x top-8 of 64 experts: every expert is expected to be hit
    assert traffic.expected_experts_hit(arch, t) == pytest.approx(64, rel=1e-6)
    assert traffic.expected_experts_hit(arch, 1) == pytest.approx(8)


def test_describe_reports_stage_bytes():
    d = describe("molmoe-1b", "336x336", 16)
    assert set(d["bytes"]) == set(d["flops"])
    for stage in d["bytes"].values():
        assert stage["total"] == stage["weights"] + stage["kv_cache"] + stage["activations"] > 0
    # decode: ~2.36 GB of active weights per token, about 1 FLOP per byte -> memory-bound
    step = d["bytes"]["decode_step"]
    assert 2.3e9 < step["weights"] < 2.4e9
    assert d["flops"]["decode_step"]["total"] / step["total"] < 2


def test_describe_applies_the_knobs():
    """top-k and max_crops change the counts, FLOPs and active parameters a user sees before running."""
    base = describe("molmoe-1b", "1008x784", 16, 16)
    knob = describe("molmoe-1b", "1008x784", 16, 16, moe_top_k=1, max_crops=4)
    assert (base["moe_top_k"], base["max_crops"], knob["moe_top_k"], knob["max_crops"]) == (8, 12, 1, 4)
    assert (base["vision"]["vit_crops"], knob["vision"]["vit_crops"]) == (13, 5)  # 2x2 tiles + global
    per_expert = 3 * 2048 * 1024
    assert base["params"]["llm_active_per_token"] - knob["params"]["llm_active_per_token"] == 16 * 7 * per_expert
    assert base["params"]["total"] == knob["params"]["total"]  # the knobs change work, not the weights
    assert knob["flops"]["decode_step"]["total"] < base["flops"]["decode_step"]["total"]
    with pytest.raises(ValueError, match="moe_top_k 99; allowed: null \\(the model's own\\) or an integer from 1 to 64"):
        describe("molmoe-1b", "1008x784", 16, moe_top_k=99)
