"""Rule fidelity: does e1's own loop measure what transformers' generate() runs?

Per image and eager variant (first prompt, `fidelity.decode_tokens` new tokens): the same model and inputs
run as e1's prefill + decode loop (the stage API; experts 'auto' follows generate()'s decode policy) and
through `generate()` (greedy, EOS ignored so the length is forced), alternating e1 / generate() for
`fidelity.pairs` pairs after one warm-up of each. Both are timed the same way: the host clock around the call,
with a synchronize before and after. MolmoE (e1's own assembly, no transformers VLM class): generate() of its
OLMoE receives the image features spliced into `inputs_embeds`; e1's time includes the splice (a few kernels);
the vision encoder and projector run once, untimed, for both. A transformers VLM (LLaVA, Qwen): the whole
request on both sides, e1's four stages against the model class's own generate() on the processor's outputs
(input ids, pixels, grid), vision encoder included.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from e1.jobs import env as jobenv
from e1.jobs.io import write_json
from e1.jobs.log import log
from e1.jobs.runtime import build_for, job_inputs, job_meta, resolve_job
from e1.jobs.spec import FidelityJob
from e1.model.stage_inputs import prepare

TARGET = 0.05  # e1 / generate() within +-5 %
CONVENTION = __doc__.split("\n\n", 1)[1].strip().replace("\n", " ")


@torch.inference_mode()
def e1_request(model: nn.Module, inp: Any, embeds: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """e1's loop without its marks: prefill, then N-1 decode steps in the model's decode context -> (N,) ids.
    embeds None: the vision encoder and projector run first (the whole request)."""
    if embeds is None:
        embeds = model.stage_projector(model.stage_vision(inp), inp)
    logits, cache = model.stage_prefill(inp, embeds)
    token = logits.argmax(dim=-1, keepdim=True)
    tokens = [token]
    with model.decode_experts():
        for _ in range(1, new_tokens):
            logits, cache = model.decode_step(token, cache)
            token = logits.argmax(dim=-1, keepdim=True)
            tokens.append(token)
    return torch.cat(tokens, 1)[0]


@torch.inference_mode()
def generate_request(model: nn.Module, spliced: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """transformers' generate() on the spliced embeddings (1, T, d), greedy, exactly N new tokens -> (N,) ids."""
    mask = torch.ones(spliced.shape[:2], dtype=torch.long, device=spliced.device)
    out = model.causal_lm.generate(inputs_embeds=spliced, attention_mask=mask, max_new_tokens=new_tokens,
                                   do_sample=False, eos_token_id=None, pad_token_id=model.arch.tokens["pad"])
    return out[0, -new_tokens:]


@torch.inference_mode()
def vlm_generate_request(model: nn.Module, inp: Any, new_tokens: int) -> torch.Tensor:
    """The transformers VLM's own generate() on the request's processor outputs, greedy, N new tokens -> (N,)."""
    out = model.hf.generate(**model.generate_inputs(inp), max_new_tokens=new_tokens, do_sample=False,
                            eos_token_id=None, pad_token_id=model.arch.tokens["pad"])
    return out[0, -new_tokens:]


def host_ms(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, out


def generate_experts(model: nn.Module) -> dict[str, str]:
    """What generate() runs per stage: the model's implementation for prefill, its decode policy for decode."""
    prefill = model.experts_in_use()
    owner = model.causal_lm if model.arch.family == "molmoe" else model.hf
    policy = getattr(owner, "_optimize_model_for_decode", None)
    if not callable(policy):
        return {"prefill": prefill, "decode": prefill}
    with policy():
        return {"prefill": prefill, "decode": model.experts_in_use()}


def fidelity(spec: FidelityJob, out_json: str | Path) -> dict[str, Any]:
    if spec.knobs.get("backend", "eager") != "eager":
        raise ValueError(f"backend {spec.knobs['backend']!r}: generate() runs eagerly, so the check compares eager "
                         "variants only; allowed: eager")
    arch, knobs, device, dtype = resolve_job(spec)
    env = jobenv.capture(device)
    model = build_for(spec, arch, knobs, device)
    image, prompt = job_inputs(spec)
    inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)
    n = spec.decode_tokens
    if arch.family == "molmoe":
        with torch.inference_mode():
            embeds = model.stage_projector(model.stage_vision(inp), inp)
            spliced = model.embed_inputs(inp.input_ids, embeds, inp.feature_index, inp.token_position)
        run_e1 = lambda: e1_request(model, inp, embeds, n)  # noqa: E731
        run_gen = lambda: generate_request(model, spliced, n)  # noqa: E731
    else:
        run_e1 = lambda: e1_request(model, inp, None, n)  # noqa: E731
        run_gen = lambda: vlm_generate_request(model, inp, n)  # noqa: E731
    log(f"{spec.id}: e1 loop vs generate(), {n} new tokens, 1 warm-up + {spec.pairs} interleaved pairs")
    host_ms(run_e1, device)  # warm-up of each
    host_ms(run_gen, device)
    e1_ms, gen_ms, e1_tokens, gen_tokens = [], [], None, None
    for _ in range(spec.pairs):
        ms, e1_tokens = host_ms(run_e1, device)
        e1_ms.append(ms)
        ms, gen_tokens = host_ms(run_gen, device)
        gen_ms.append(ms)
    diff = (e1_tokens.cpu() != gen_tokens.cpu()).nonzero()
    ratio = statistics.median(e1_ms) / statistics.median(gen_ms)
    result = {
        "id": spec.id, "variant": spec.variant, "knobs": knobs, "image": spec.image, "prompt": spec.prompt,
        "decode_tokens": n, "prefill_tokens": int(inp.input_ids.shape[1]), "counts": layout.counts(),
        "e1_ms": e1_ms, "generate_ms": gen_ms, "e1_median_ms": statistics.median(e1_ms),
        "generate_median_ms": statistics.median(gen_ms), "ratio_e1_over_generate": ratio,
        "pair_ratios": [a / b for a, b in zip(e1_ms, gen_ms)], "within_target": abs(ratio - 1) <= TARGET,
        "target": f"e1 / generate() within +-{TARGET:.0%}",
        "tokens_equal": not len(diff), "first_mismatch": int(diff[0]) if len(diff) else None,
        "experts_used": {"e1": {"prefill": model.experts_in_use(), "decode": _decode_experts(model)},
                         "generate": generate_experts(model)},
        "convention": CONVENTION,
        "meta": job_meta(spec, model, device, dtype, env, prompt),
    }
    write_json(out_json, result)
    log(f"{spec.id}: e1 {result['e1_median_ms']:.1f} ms, generate() {result['generate_median_ms']:.1f} ms "
        f"(ratio {ratio:.3f}), tokens equal: {result['tokens_equal']}")
    return result


def _decode_experts(model: nn.Module) -> str:
    with model.decode_experts():
        return model.experts_in_use()
