"""The cuda_graph backend: every stage on static buffers equals eager; capture and replay on a GPU only.

CPU: the tiny model in float32, the stages run eagerly on the static buffers (the code a graph captures).
GPU (skipped here with the reason): the captured graphs give eager's tokens and logits within LOGIT_RTOL.
"""

from __future__ import annotations

import pytest
import torch

from e1.latency.timing import timed_generate
from e1.model.arch import load_arch
from e1.model.build import build_model
from e1.model.graphs import LOGIT_RTOL, GraphedRequest, check_graph_support, compare_with_eager

NEW = 40  # long enough that a frozen position or stale cache slot would change the tokens
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU; none here")


def test_static_request_same_tokens_as_eager(model, inp):
    eager = timed_generate(model, inp, NEW)
    graphs = GraphedRequest(model, inp, NEW)
    static = timed_generate(model, inp, NEW, graphs=graphs)
    assert torch.equal(eager.tokens, static.tokens)
    assert len(static.decode_steps_ms) == NEW - 1 and set(static.stages_ms) == set(eager.stages_ms)
    assert int(graphs.kv.pos) == inp.input_ids.shape[1] + NEW - 1  # one slot written per decode step
    again = timed_generate(model, inp, NEW, graphs=graphs)  # a second run restarts from its own prefill
    assert torch.equal(eager.tokens, again.tokens)
    assert static.experts == eager.experts == {"prefill": "grouped_mm", "decode": "grouped_mm"}  # CPU: no switch


def test_static_request_with_batched_mm_and_top1(inp):
    arch = load_arch("molmoe-1b-tiny").with_knobs(moe_top_k=1)
    m = build_model(arch, experts_implementation="batched_mm")
    graphs = GraphedRequest(m, inp, 12)
    assert torch.equal(timed_generate(m, inp, 12).tokens, timed_generate(m, inp, 12, graphs=graphs).tokens)


def test_inputs_of_another_shape_are_refused(model, inp):
    graphs = GraphedRequest(model, inp, 3)
    other = type(inp)(inp.crops[:1], inp.patch_masks[:1], inp.input_ids, inp.feature_index, inp.token_position)
    with pytest.raises(ValueError, match="do not fit the graphs'"):
        graphs.load(other)


@pytest.mark.parametrize("device,attn,experts,bad", [
    ("cpu", "sdpa", "grouped_mm", "needs device cuda; this run's device is 'cpu'"),
    ("cuda", "flash_attention_2", "grouped_mm", "attn_implementation 'flash_attention_2'"),
    ("cuda", "sdpa", "eager", "experts_implementation 'eager'"),
    ("cuda", "sdpa", "grouped_mm", "grouped_mm experts in float32"),
    ("cuda", "sdpa", "auto", "auto experts in float32"),
])
def test_graph_support_errors_name_the_setting(device, attn, experts, bad):
    with pytest.raises(ValueError, match=bad):
        check_graph_support({"attn_implementation": attn, "experts_implementation": experts}, device, torch.float32)


def test_eager_comparison_agrees_on_cpu(model, inp):
    graphs = GraphedRequest(model, inp, 12)
    out = compare_with_eager(timed_generate(model, inp, 12, graphs=graphs).tokens, model, inp, 12, graphs)
    assert out["equal"] and out["first_mismatch"] is None and out["compared_tokens"] == 12
    tf = out["teacher_forced"]
    assert tf["steps"] == 11 and tf["argmax_agree"] == 11 and tf["disagreements"] == []
    assert out["prefill_logits_rel_diff"] < 1e-5 and tf["max_logits_rel_diff"] < LOGIT_RTOL["float32"]
    assert out["logits_within_tolerance"] is True and out["logits_rtol"] == LOGIT_RTOL["float32"]


def test_eager_comparison_with_balanced_routing(inp):
    """The guard interleaves the graphs' request and an eager one on one model: with balanced routing each keeps
    its own counters, so both are routed alike (one shared counter would route them differently)."""
    from e1.model.routing import set_routing

    m = build_model("molmoe-1b-tiny", device="cpu", dtype="float32")
    set_routing(m, "balanced")
    graphs = GraphedRequest(m, inp, 12)
    out = compare_with_eager(timed_generate(m, inp, 12, graphs=graphs).tokens, m, inp, 12, graphs)
    assert out["equal"] and out["teacher_forced"]["argmax_agree"] == 11
    assert out["teacher_forced"]["max_logits_rel_diff"] < LOGIT_RTOL["float32"]


@GPU
@pytest.mark.parametrize("dtype,experts", [("bfloat16", "auto"), ("bfloat16", "grouped_mm"),
                                           ("bfloat16", "batched_mm"), ("float32", "batched_mm")])
def test_cuda_graphs_agree_with_eager_on_gpu(inp, dtype, experts):
    dev = torch.device("cuda")
    m = build_model("molmoe-1b-tiny", device="cuda", dtype=dtype, experts_implementation=experts)
    gpu_inp = type(inp)(**{k: v.to(dev) if v.dtype == torch.long else v.to(dev, m.lm_head.weight.dtype)
                           for k, v in vars(inp).items()})
    eager = timed_generate(m, gpu_inp, NEW)
    graphs = GraphedRequest(m, gpu_inp, NEW)
    graphs.capture()
    graph = timed_generate(m, gpu_inp, NEW, graphs=graphs)
    assert torch.equal(eager.tokens.cpu(), graph.tokens.cpu())
    assert graph.experts == eager.experts
    if experts == "auto":  # what generate() runs on a GPU: the library's default, then its decode policy
        assert eager.experts["prefill"] == "grouped_mm" and eager.experts["decode"] == "batched_mm", eager.experts
    check = compare_with_eager(graph.tokens.cpu(), m, gpu_inp, NEW, graphs)
    assert check["equal"] and check["logits_within_tolerance"], check


@GPU
def test_balanced_routing_replays_like_eager(inp):
    """Balanced routing's device counter is set by the prefill and advanced by each decode step in graph
    replays as in eager runs: both give the same tokens and leave the same counters (a frozen counter would
    route every decode step to the same experts)."""
    from e1.model.routing import _Balance, set_routing

    dev = torch.device("cuda")
    m = build_model("molmoe-1b-tiny", device="cuda", dtype="bfloat16")
    set_routing(m, "balanced")
    counters = [h for layer in m.llm.layers for h in layer.mlp.gate._forward_hooks.values() if isinstance(h, _Balance)]
    assert len(counters) == len(m.llm.layers)
    gpu_inp = type(inp)(**{k: v.to(dev) if v.dtype == torch.long else v.to(dev, torch.bfloat16)
                           for k, v in vars(inp).items()})
    for c in counters:
        c.offset.fill_(5)  # whatever came before: a request starts from its prefill
    eager = timed_generate(m, gpu_inp, NEW)
    after_eager = [int(c.offset) for c in counters]
    graphs = GraphedRequest(m, gpu_inp, NEW)
    graphs.capture()
    graph = timed_generate(m, gpu_inp, NEW, graphs=graphs)
    assert [int(c.offset) for c in counters] == after_eager
    assert torch.equal(eager.tokens.cpu(), graph.tokens.cpu())
