"""Expert routing: the balanced assignment, the load statistics every measure job records, and the knob."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from e1.model.arch import load_arch
from e1.model.build import build_model
from e1.model.routing import expert_load, load_stats, set_routing
from e1.model.stage_inputs import prepare

TINY = load_arch("molmoe-1b-tiny")
E, K = TINY.llm["num_experts"], TINY.llm["top_k"]


def _inputs(model):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8))
    inp, _ = prepare(TINY, img, list(range(100, 120)), torch.device("cpu"), torch.float32)
    return inp


def _model(mode: str, experts: str = "auto"):
    m = build_model("molmoe-1b-tiny", experts_implementation=experts)
    set_routing(m, mode)
    return m


def test_balanced_gives_every_expert_the_same_load():
    model = _model("balanced")
    inp = _inputs(model)
    t = inp.input_ids.shape[1]
    load = expert_load(model, inp, 9)
    for counts in load["prefill"]["counts"]:
        assert sum(counts) == t * K and max(counts) - min(counts) <= 1  # floor or ceil of T*k/E each
    # 8 decode steps x 2 slots = 16 slots over 8 experts: exactly 2 each (the offset rotates between steps)
    assert load["decode"]["counts"] == [[2] * E] * TINY.llm["num_layers"]
    assert load["decode"]["max_over_mean"]["max"] == 1.0


def test_balanced_requests_repeat():
    """Every request is routed the same way: its counts and its tokens do not depend on what ran before."""
    model = _model("balanced")
    inp = _inputs(model)
    first, second = expert_load(model, inp, 6), expert_load(model, inp, 6)
    assert first["prefill"]["counts"] == second["prefill"]["counts"]
    assert first["decode"]["counts"] == second["decode"]["counts"]


def test_balanced_tokens_get_distinct_experts_and_keep_weights():
    model = _model("balanced")
    gate = model.llm.layers[0].mlp.gate
    h = torch.randn(7, TINY.llm["hidden_size"])
    logits, weights, index = gate(h)
    assert index.shape == (7, K) and all(len(set(row.tolist())) == K for row in index)
    model_learned = _model("learned")
    ref_logits, ref_weights, ref_index = model_learned.llm.layers[0].mlp.gate(h)
    torch.testing.assert_close(logits, ref_logits)  # the router still runs: same logits and top-k weights
    torch.testing.assert_close(weights, ref_weights)
    assert not torch.equal(index, ref_index)


def test_learned_counts_match_the_routers_choice():
    model = _model("learned")
    inp = _inputs(model)
    t = inp.input_ids.shape[1]
    load = expert_load(model, inp, 4)
    assert load["prefill"]["tokens"] == t and load["decode"]["tokens"] == 3
    for counts in load["decode"]["counts"]:
        assert sum(counts) == 3 * K
    layer = load["prefill"]["per_layer"][0]
    c = load["prefill"]["counts"][0]
    assert layer["max_over_mean"] == pytest.approx(max(c) / (sum(c) / E))
    assert layer["experts_hit"] == sum(1 for x in c if x)
    assert expert_load(model, inp, 1)["decode"] is None


@torch.no_grad()
def test_balanced_keeps_every_flop():
    """Same FLOPs with either routing (eager experts: torch counts each expert's matmuls)."""
    flops = {}
    for mode in ("learned", "balanced"):
        model = _model(mode, experts="eager")
        inp = _inputs(model)
        feats = model.encode_images(inp.crops)
        emb = model.project(feats, inp.patch_masks)
        with FlopCounterMode(display=False) as fc:
            model.prefill(inp.input_ids, emb, inp.feature_index, inp.token_position)
        flops[mode] = fc.get_total_flops()
    assert flops["learned"] == flops["balanced"] > 0


def test_load_stats_arithmetic():
    s = load_stats([[6, 2, 0, 0], [2, 2, 2, 2]], top_k=2)
    assert s["tokens"] == 4 and s["slots_per_layer"] == 8
    assert [layer["max_over_mean"] for layer in s["per_layer"]] == [3.0, 1.0]
    assert s["max_over_mean"] == {"mean": 2.0, "min": 1.0, "max": 3.0}
    assert [layer["experts_hit"] for layer in s["per_layer"]] == [2, 4]
    assert s["busiest8_share"]["mean"] == 1.0  # 4 experts: the busiest 8 are all of them


def test_bad_routing_mode():
    with pytest.raises(ValueError, match="moe_routing 'random'; allowed: learned, balanced"):
        set_routing(build_model("molmoe-1b-tiny"), "random")
