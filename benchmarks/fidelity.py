"""Fidelity and cost of the timing core on a GPU (issues: model build, stage timing, overhead, generate()).

Measures, on the full model with random weights:
  build time and peak memory; the 1008x784 configuration through prefill + 16 decode steps;
  sum of stages vs e2e; the cost of the events (same loop with and without them, interleaved);
  our prefill+decode vs transformers' generate() at the same forced length on the same weights;
  a profile of both over 9 new tokens (launches, host and device time); the import cost of a job.
Usage: python benchmarks/fidelity.py --out bench.json [--model molmoe-1b] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from e1.jobs import env as envinfo
from e1.model.arch import load_arch
from e1.inputs.images import synthetic_image
from e1.inputs.prompts import make_prompt
from e1.model.stage_inputs import prepare
from e1.model.build import build_model
from e1.latency.timing import timed_generate


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def inputs_for(arch, size: tuple[int, int], prompt_tokens: int, device, dtype):
    text_ids = make_prompt(arch, "bench", prompt_tokens, None, None)["text_ids"]
    return prepare(arch, synthetic_image(*size), text_ids, device, dtype)[0]


def runs(model, inp, n_new: int, warmup: int, timed: int, events: bool = True):
    for _ in range(warmup):
        timed_generate(model, inp, n_new, events=events)
    return [timed_generate(model, inp, n_new, events=events) for _ in range(timed)]


def hf_generate_ms(model, inp, n_new: int, warmup: int, timed: int) -> tuple[list[float], torch.Tensor]:
    """transformers' generate() from the same spliced embeddings, forced to n_new tokens, greedy."""
    from transformers.models.olmoe.modeling_olmoe import OlmoeForCausalLM

    with torch.device("meta"):
        hf = OlmoeForCausalLM(model.llm_config)
    hf.model, hf.lm_head = model.llm, model.lm_head  # share the weights: nothing is copied
    with torch.inference_mode():
        feats = model.encode_images(inp.crops)
        embeds = model.project(feats, inp.patch_masks)
        x = model.embed_inputs(inp.input_ids, embeds, inp.feature_index, inp.token_position)
        kw = dict(inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device),
                  max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, num_beams=1,
                  eos_token_id=None, pad_token_id=model.arch.tokens["pad"])
        times, out = [], None
        for i in range(warmup + timed):
            sync()
            t0 = time.perf_counter()
            out = hf.generate(**kw)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return times, out[0, -n_new:]


def profile_summary(fn, table_path: str) -> dict:
    """torch.profiler over fn: kernel launches, host and device time; writes the op table."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        fn()
        sync()
    wall = (time.perf_counter() - t0) * 1e3
    ka = prof.key_averages()
    with open(table_path, "w") as f:
        f.write(ka.table(sort_by="self_cpu_time_total", row_limit=40))
    launches = sum(e.count for e in ka if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    device_us = sum(e.self_device_time_total for e in ka) if torch.cuda.is_available() else 0.0
    return {"wall_ms_profiled": wall, "kernel_launches": launches, "device_busy_ms": device_us / 1e3,
            "ops": sum(e.count for e in ka if e.key.startswith("aten::"))}


def save(report: dict, path: str) -> None:
    """Write what has been measured so far (a killed run keeps its finished sections)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="molmoe-1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    a = ap.parse_args()
    device = torch.device(a.device)
    arch = load_arch(a.model)
    report: dict = {"model": a.model, "env": envinfo.capture(device)}

    t0 = time.perf_counter()
    model = build_model(arch, device=a.device, dtype=a.dtype, weights="random", seed=0)
    sync()
    report["build_s"] = time.perf_counter() - t0
    report["memory_after_build_gib"] = peak_gib()
    print(f"build {report['build_s']:.1f} s, {report['memory_after_build_gib']:.1f} GiB", flush=True)
    dtype = next(model.parameters()).dtype

    # 1) issue check: 1008x784 through prefill + 16 decode steps
    inp = inputs_for(arch, (1008, 784), 20, device, dtype)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rs = runs(model, inp, 16, 3, 10)
    report["cfg_1008x784_p20_n16"] = {
        "prefill_tokens": int(inp.input_ids.shape[1]),
        "median_ms": {s: med([r.stages_ms[s] for r in rs]) for s in rs[0].stages_ms},
        "median_decode_step_ms": med([x for r in rs for x in r.decode_steps_ms]),
        "median_e2e_ms": med([r.e2e_ms for r in rs]),
        "peak_memory_gib": peak_gib(),
    }
    print("1008x784 n16", json.dumps(report["cfg_1008x784_p20_n16"]), flush=True)
    save(report, a.out)

    # 2) fidelity: sum of stages vs e2e, and the events' cost (interleaved with/without)
    fid = {}
    for size, pt, n_new in (((560, 560), 40, 64), ((1008, 784), 120, 16), ((336, 336), 16, 64)):
        inp = inputs_for(arch, size, pt, device, dtype)
        runs(model, inp, n_new, 3, 0)
        with_ev, without = [], []
        for _ in range(10):
            with_ev.append(timed_generate(model, inp, n_new, events=True))
            without.append(timed_generate(model, inp, n_new, events=False).e2e_ms)
        e2e = statistics.mean(r.e2e_ms for r in with_ev)
        ssum = statistics.mean(sum(r.stages_ms.values()) for r in with_ev)
        key = f"{size[0]}x{size[1]}_p{pt}_n{n_new}"
        fid[key] = {
            "mean_e2e_ms_events": e2e, "mean_stage_sum_ms": ssum, "stage_sum_over_e2e": ssum / e2e,
            "mean_e2e_ms_no_events": statistics.mean(without),
            "event_overhead": e2e / statistics.mean(without) - 1,
            "cv_by_stage": {s: statistics.stdev([r.stages_ms[s] for r in with_ev]) /
                            statistics.mean([r.stages_ms[s] for r in with_ev]) for s in with_ev[0].stages_ms},
        }
        print("fidelity", key, json.dumps(fid[key]), flush=True)
        report["fidelity"] = fid
        save(report, a.out)

    # 3) ours vs transformers generate() (LLM part only: prefill + decode from the same embeddings)
    inp = inputs_for(arch, (1008, 784), 20, device, dtype)
    gen = {}
    for n_new in (16, 64):
        ours = runs(model, inp, n_new, 3, 10)
        hf_ms, hf_tokens = hf_generate_ms(model, inp, n_new, 3, 10)
        ours_llm = med([r.stages_ms["prefill"] + r.stages_ms["decode"] for r in ours])
        gen[f"n{n_new}"] = {"ours_prefill_plus_decode_ms": ours_llm, "hf_generate_ms": med(hf_ms),
                            "hf_over_ours": med(hf_ms) / ours_llm,
                            "same_tokens": bool(torch.equal(ours[-1].tokens.cpu(), hf_tokens.cpu()))}
        print("generate", n_new, json.dumps(gen[f"n{n_new}"]), flush=True)
        report["vs_generate"] = gen
        save(report, a.out)

    # 4) why the two differ: host (CPU) and device time per op for 9 new tokens each
    report["profile_9_tokens"] = {
        "ours": profile_summary(lambda: timed_generate(model, inp, 9), a.out + ".ours_profile.txt"),
        "hf_generate": profile_summary(lambda: hf_generate_ms(model, inp, 9, 0, 1), a.out + ".hf_profile.txt"),
    }
    print("profile", json.dumps(report["profile_9_tokens"]), flush=True)

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import e1.latency.measure"], check=True)
    report["import_e1_measure_s"] = time.perf_counter() - t0
    if device.type == "cuda":
        report["env"]["gpu_after"] = envinfo.gpu_state(0)
    save(report, a.out)
    print(json.dumps({k: v for k, v in report.items() if k != "env"}, indent=1))


if __name__ == "__main__":
    main()
