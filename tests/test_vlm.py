"""The transformers-based adapters (LLaVA-1.5, Qwen2.5-VL, Qwen3-VL-MoE) on their tiny variants, CPU, fp32:
e1's stage decomposition against transformers' own forward, token counts against the image processors, the
analytic FLOPs against FlopCounterMode, the timing loop and the static-buffer (CUDA-graph) request."""

import inspect
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from e1.inputs.images import synthetic_image
from e1.inputs.prompts import make_prompt
from e1.latency.timing import timed_generate
from e1.model.arch import load_arch
from e1.model.build import build_model
from e1.model.graphs import GraphedRequest, compare_with_eager
from e1.model.stage_inputs import prepare
from e1.roofline import flops
from e1.roofline.flopcheck import check_stages
from e1.vlm.families import layout_for, prefill_tokens

TINY = ["llava-1.5-7b-tiny", "qwen2.5-vl-7b-tiny", "qwen3-vl-30b-a3b-tiny"]
FULL = ["llava-1.5-7b", "qwen2.5-vl-7b", "qwen3-vl-30b-a3b"]
CPU = torch.device("cpu")


def request(arch, w=560, h=420, eager_attn=False):
    text = make_prompt(arch, "short", 16, None, None)["text_ids"]
    return prepare(arch, synthetic_image(w, h), text, CPU, torch.float32)


@pytest.fixture(scope="module", params=TINY)
def built(request):
    arch = load_arch(request.param)
    return arch, build_model(arch, "cpu", "float32", attn_implementation="eager", seed=1)


def hf_logits(arch, model, inp, ids):
    """transformers' own forward of the whole model on `ids` (image tokens included): logits (1, T, vocab)."""
    hf = model.hf
    if arch.family == "llava":
        return hf(input_ids=ids, pixel_values=inp.pixel_values).logits
    grid = torch.tensor([[1, *layout_for(arch, 560, 420).grid]])
    extra = {}
    if "mm_token_type_ids" in inspect.signature(type(hf).forward).parameters:  # transformers >= 5.2x asks for it
        extra["mm_token_type_ids"] = (ids == arch.tokens["image"]).long()
    return hf(input_ids=ids, pixel_values=inp.pixel_values, image_grid_thw=grid, **extra).logits


@torch.inference_mode()
def test_stages_reproduce_transformers_forward(built):
    """Prefill's last logits and three greedy decode steps equal transformers' forward of the same sequence."""
    arch, model = built
    inp, _ = request(arch)
    logits, cache = model.stage_prefill(inp, model.stage_projector(model.stage_vision(inp), inp))
    ids = inp.input_ids
    ref = hf_logits(arch, model, inp, ids)[:, -1]
    scale = ref.abs().max()
    assert (logits - ref).abs().max() <= 1e-4 * scale
    for _ in range(3):
        token = logits.argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], 1)
        logits, cache = model.decode_step(token, cache)
        ref = hf_logits(arch, model, inp, ids)[:, -1]
        assert (logits - ref).abs().max() <= 1e-4 * scale


@pytest.mark.parametrize("name", TINY + FULL)
@pytest.mark.parametrize("size", [(336, 336), (560, 560), (1008, 784), (333, 1201), (64, 48)])
def test_planned_counts_equal_the_image_processor(name, size):
    """The torch-free layout (what the workflow plans with) agrees with transformers' image processor."""
    arch = load_arch(name)
    w, h = size
    layout = layout_for(arch, w, h)
    inp, got = request(arch, w, h)
    assert got.counts() == layout.counts()
    assert inp.input_ids.shape[1] == prefill_tokens(arch, w, h, len(make_prompt(arch, "short", 16, None, None)["text_ids"]))
    if arch.family == "llava":
        assert (layout.vit_tokens, layout.pooled_features) == (577, 576)
    else:
        patches = inp.pixel_values.shape[0]
        assert layout.vit_tokens == patches and layout.pooled_features == patches // 4
        assert int((inp.input_ids == arch.tokens["image"]).sum()) == layout.pooled_features


def test_image_tokens_grow_with_the_image_only_for_dynamic_resolution():
    small, large = (336, 336), (1008, 784)
    llava = load_arch("llava-1.5-7b")
    assert layout_for(llava, *small).image_tokens == layout_for(llava, *large).image_tokens == 576
    for name, want in (("qwen2.5-vl-7b", (144, 1008)), ("qwen3-vl-30b-a3b", (100, 768))):
        arch = load_arch(name)
        assert (layout_for(arch, *small).pooled_features, layout_for(arch, *large).pooled_features) == want


@torch.inference_mode()
def test_analytic_flops_equal_the_counter(built):
    """Every stage, eager attention (plain matmuls) and transformers' default experts (grouped_mm, counted with
    e1's formula): analytic = counted, except prefill attention, which eager computes over the full T x T."""
    arch, model = built
    inp, layout = request(arch)
    got = check_stages(model, arch, inp, layout)
    t = inp.input_ids.shape[1]

    def rope(n: int) -> int:  # transformers 5.17 computes the LLM's rotary angles with a (tiny) matmul
        x = torch.zeros(1, n, arch.llm["hidden_size"])
        with FlopCounterMode(display=False) as fc:
            model.llm.rotary_emb(x, model.rope_ids(torch.arange(n)))
        return fc.get_total_flops()

    for stage in ("vision_encoder", "projector"):
        assert got[stage]["analytic"] == got[stage]["counted"], stage
    assert got["decode_step"]["analytic"] == got["decode_step"]["counted"] - rope(1)
    a = arch.llm
    q = a["num_heads"] * a.get("head_dim", a["hidden_size"] // a["num_heads"])
    want = got["prefill"]["analytic_components"]
    causal = want["attention_scores"] + want["attention_values"]
    assert got["prefill"]["counted"] - rope(t) == got["prefill"]["analytic"] - causal + 2 * 2 * a["num_layers"] * t * t * q


@pytest.mark.parametrize("name", FULL)
def test_full_size_parameters_match_the_released_models(name):
    """Parameter counts of the full architectures (built on the meta device) against the released models'."""
    released = {"llava-1.5-7b": 7_063_427_072, "qwen2.5-vl-7b": 8_292_166_656, "qwen3-vl-30b-a3b": 31_070_754_032}
    counts = build_model(name, device="meta", dtype="bfloat16").param_counts()
    assert counts["total"] == released[name]


@torch.inference_mode()
def test_timed_generate_and_static_request_agree(built):
    """The timing loop runs every adapter; the static-buffer request (the CUDA-graph path, eager on CPU) makes
    the same tokens as eager decoding."""
    arch, model = built
    inp, _ = request(arch)
    t = timed_generate(model, inp, 6)
    assert set(t.stages_ms) == {"vision_encoder", "projector", "prefill", "decode"} and len(t.decode_steps_ms) == 5
    graphs = GraphedRequest(model, inp, 6)
    graphs.load(inp)
    graphs.vision(), graphs.project()
    tokens = [graphs.prefill()] + [graphs.step() for _ in range(5)]
    assert torch.equal(torch.cat(tokens, 1)[0], t.tokens)
    cmp = compare_with_eager(t.tokens, model, inp, 6, graphs)
    assert cmp["equal"] and cmp["logits_within_tolerance"]


def test_stage_flops_grow_as_the_architecture_says():
    """Sanity of the analytic formulas at full size: LLaVA's vision FLOPs are fixed, Qwen's grow with the image;
    Qwen3-VL's decode step reads top-8 of 128 experts."""
    llava, qwen = load_arch("llava-1.5-7b"), load_arch("qwen2.5-vl-7b")

    def vision(arch, w, h):
        c = {**layout_for(arch, w, h).counts(), "prefill_tokens": 1000}
        return flops.stage_flops(arch, c)["vision_encoder"]["total"]

    assert vision(llava, 336, 336) == vision(llava, 1008, 784)
    assert vision(qwen, 1008, 784) > 5 * vision(qwen, 336, 336)
    q3 = load_arch("qwen3-vl-30b-a3b")
    step = flops.stage_flops(q3, {**layout_for(q3, 336, 336).counts(), "prefill_tokens": 100})["decode_step"]
    assert step["moe_experts"] == 2 * 48 * 8 * 3 * 2048 * 768


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", TINY)
def test_cuda_graphs_agree_with_eager_on_gpu(name):
    """Every stage of each adapter captured in a CUDA graph (bfloat16, sdpa, experts auto) replays what eager
    decoding computes."""
    arch, cuda = load_arch(name), torch.device("cuda")
    model = build_model(arch, "cuda", "bfloat16", seed=1)
    text = make_prompt(arch, "short", 16, None, None)["text_ids"]
    inp, _ = prepare(arch, synthetic_image(560, 420), text, cuda, torch.bfloat16)
    graphs = GraphedRequest(model, inp, 12)
    graphs.capture()
    run = timed_generate(model, inp, 12, graphs=graphs)
    cmp = compare_with_eager(run.tokens.cpu(), model, inp, 12, graphs)
    assert cmp["logits_within_tolerance"], cmp


@torch.inference_mode()
def test_component_ranges_name_every_part(built):
    """The profiler ranges of a transformers VLM: vision attention and MLP, the projector, the LLM's attention and
    its dense MLP (ffn) or router and experts, all seen in a profiled run."""
    from torch.profiler import profile

    from e1.names import COMP_RANGE
    from e1.profile.ranges import component_ranges

    arch, model = built
    inp, _ = request(arch)
    with component_ranges(model), profile() as prof:
        timed_generate(model, inp, 3, annotate=True)
    names = {e.name.removeprefix(COMP_RANGE).split("@")[0] for e in prof.events() if e.name.startswith(COMP_RANGE)}
    ffn = {"moe_router", "moe_experts"} if "num_experts" in arch.llm else {"ffn"}
    assert {"vit_embed", "vit_attention", "vit_mlp", "projector_mlp", "embedding", "attention", "norm", "lm_head",
            "sampling"} | ffn <= names, names


@pytest.mark.parametrize("name", TINY + FULL)
def test_analytic_parameters_equal_the_built_model(name):
    """The traffic model's parameter counts per stage equal the model's own (meta device)."""
    from e1.vlm import traffic

    arch = load_arch(name)
    got = build_model(arch, device="meta", dtype="bfloat16").param_counts()
    assert (traffic.vision_params(arch), traffic.projector_params(arch), traffic.llm_params(arch)) == \
        (got["vision_encoder"], got["projector"], got["llm"])
    step = traffic.decode_step(arch, 0, dtype_bytes=1)["weights"]
    assert step == got["llm_active_per_token"] + arch.llm["hidden_size"]  # + the one embedding row


@torch.inference_mode()
def test_e1_loop_makes_generates_tokens(built):
    """Rule fidelity's two requests on a transformers VLM: e1's four stages and the model class's own generate()
    on the processor's outputs give the same greedy tokens (float32)."""
    from e1.latency.fidelity import e1_request, vlm_generate_request

    arch, model = built
    inp, _ = request(arch)
    assert torch.equal(e1_request(model, inp, None, 6), vlm_generate_request(model, inp, 6))


def test_the_schema_lists_every_shipped_architecture():
    """config.schema.yaml's model names are the shipped architecture files."""
    import yaml

    from e1.model.arch import known_models

    schema = yaml.safe_load((Path(__file__).resolve().parents[1] / "workflow/schemas/config.schema.yaml").read_text())
    assert sorted(schema["properties"]["model"]["enum"][1:]) == known_models()
    assert sorted(schema["properties"]["models"]["oneOf"][1]["items"]["enum"]) == known_models()
