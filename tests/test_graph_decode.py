"""Decode backends: the static-cache decode step equals eager decoding; CUDA-graph capture on a GPU only.

CPU: the tiny model in float32, the static step run eagerly (the code a graph would capture).
"""

from __future__ import annotations

import pytest
import torch

from e1.model.arch import load_arch
from e1.model.build import build_model
from e1.latency.measure import compare_with_eager
from e1.model.graph_decode import StaticDecoder, check_graph_support
from e1.latency.timing import timed_generate

NEW = 40  # long enough that a frozen position or stale cache slot would change the tokens


def test_static_decode_same_tokens_as_eager(model, inp):
    eager = timed_generate(model, inp, NEW)
    dec = StaticDecoder(model, max_len=inp.input_ids.shape[1] + NEW)
    static = timed_generate(model, inp, NEW, decoder=dec)
    assert torch.equal(eager.tokens, static.tokens)
    assert len(static.decode_steps_ms) == NEW - 1
    assert int(dec.kv.pos) == inp.input_ids.shape[1] + NEW - 1  # one slot written per decode step
    again = timed_generate(model, inp, NEW, decoder=dec)  # a second run restarts from its own prefill
    assert torch.equal(eager.tokens, again.tokens)


def test_static_decode_with_batched_mm_and_top1(inp):
    arch = load_arch("molmoe-1b-tiny").with_knobs(moe_top_k=1)
    m = build_model(arch, experts_implementation="batched_mm")
    dec = StaticDecoder(m, max_len=inp.input_ids.shape[1] + 12)
    assert torch.equal(timed_generate(m, inp, 12).tokens, timed_generate(m, inp, 12, decoder=dec).tokens)


def test_static_cache_too_small_is_an_error(model, inp):
    dec = StaticDecoder(model, max_len=inp.input_ids.shape[1])
    with pytest.raises(ValueError, match="does not fit a static cache"):
        timed_generate(model, inp, 3, decoder=dec)


@pytest.mark.parametrize("device,attn,experts,bad", [
    ("cpu", "sdpa", "grouped_mm", "needs device cuda; this run's device is 'cpu'"),
    ("cuda", "flash_attention_2", "grouped_mm", "attn_implementation 'flash_attention_2'"),
    ("cuda", "sdpa", "eager", "experts_implementation 'eager'"),
    ("cuda", "sdpa", "grouped_mm", "grouped_mm experts in float32"),
])
def test_graph_support_errors_name_the_setting(device, attn, experts, bad):
    with pytest.raises(ValueError, match=bad):
        check_graph_support({"attn_implementation": attn, "experts_implementation": experts}, device, torch.float32)


def test_eager_comparison_agrees_on_cpu(model, inp):
    dec = StaticDecoder(model, max_len=inp.input_ids.shape[1] + 12)
    out = compare_with_eager(timed_generate(model, inp, 12).tokens, model, inp, 12, dec)
    assert out["equal"] and out["first_mismatch"] is None and out["compared_tokens"] == 12
    tf = out["teacher_forced"]
    assert tf["steps"] == 11 and tf["argmax_agree"] == 11 and tf["disagreements"] == []
    assert tf["max_abs_logit_diff"] < 1e-4  # float32, same ops up to the masked static attention


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a CUDA GPU; this machine has none")
@pytest.mark.parametrize("dtype,experts", [("bfloat16", "grouped_mm"), ("bfloat16", "batched_mm"),
                                           ("float32", "batched_mm")])
def test_cuda_graph_same_tokens_as_eager_on_gpu(inp, dtype, experts):
    dev = torch.device("cuda")
    m = build_model("molmoe-1b-tiny", device="cuda", dtype=dtype, experts_implementation=experts)
    gpu_inp = type(inp)(**{k: v.to(dev) if v.dtype == torch.long else v.to(dev, m.lm_head.weight.dtype)
                           for k, v in vars(inp).items()})
    eager = timed_generate(m, gpu_inp, NEW)
    dec = StaticDecoder(m, max_len=gpu_inp.input_ids.shape[1] + NEW)
    timed_generate(m, gpu_inp, 2, decoder=dec)  # a started state to capture from
    dec.capture()
    graph = timed_generate(m, gpu_inp, NEW, decoder=dec)
    assert torch.equal(eager.tokens.cpu(), graph.tokens.cpu())
