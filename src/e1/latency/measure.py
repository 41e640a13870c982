"""One measurement job (rule measure): build the model once, warm up, time one configuration, write
its per-run rows (Parquet) and its summary (JSON)."""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from e1.jobs import env as jobenv
from e1.jobs import hostload
from e1.jobs.io import atomic_path, write_json
from e1.jobs.log import log
from e1.jobs.runtime import build_for, job_inputs, job_meta, resolve_device, variant_arch
from e1.jobs.spec import MeasureJob
from e1.latency.stats import summarize
from e1.latency.timing import CONVENTION, RunTiming, timed_generate
from e1.model.build import resolve_dtype
from e1.model.graph_decode import StaticDecoder, check_graph_support
from e1.model.molmoe import MolmoE
from e1.model.preprocess import check_context
from e1.model.stage_inputs import StageInputs, prepare
from e1.names import STAGES


def graph_decoder(model: MolmoE, inp: StageInputs, new_tokens: int) -> tuple[StaticDecoder, float]:
    """A decoder whose step is captured once for this configuration; returns it and the capture seconds."""
    dec = StaticDecoder(model, max_len=inp.input_ids.shape[1] + max(new_tokens, 4))  # capture warm-up: 3 steps
    timed_generate(model, inp, 2, decoder=dec)  # a started state (and one eager static step)
    return dec, dec.capture()


@torch.inference_mode()
def compare_with_eager(graph_tokens: torch.Tensor, model: MolmoE, inp: StageInputs, new_tokens: int,
                       dec: StaticDecoder) -> dict[str, Any]:
    """The guard for cuda_graph, in one eager decoding pass that also feeds the static decoder.

    Free-running: the graph's tokens (a timed run) against eager decoding's. Teacher-forced: at every step
    the static decoder gets eager's token and cache contents; does its argmax agree, how far apart are the
    logits, and where the argmax differs, how close eager's top two logits were (a near-tie flipped by
    rounding, or a real fault).
    """
    logits, cache = model.prefill(inp.input_ids, model.project(model.encode_images(inp.crops), inp.patch_masks),
                                  inp.feature_index, inp.token_position)
    token = logits.argmax(dim=-1, keepdim=True)  # (1, 1)
    dec.start(cache, token)
    eager, agree, max_diff, flips = [token], 0, 0.0, []
    for step in range(1, new_tokens):
        dec.token.copy_(token)
        dec.step()
        logits, cache = model.decode_step(token, cache)
        token = logits.argmax(dim=-1, keepdim=True)
        eager.append(token)
        max_diff = max(max_diff, float((logits.float() - dec.logits.float()).abs().max()))
        if torch.equal(dec.token, token):
            agree += 1
        else:
            top2 = logits.float().topk(2).values[0]
            flips.append({"step": step, "eager_top2_margin": float(top2[0] - top2[1])})
    diff = (torch.cat(eager, 1)[0].cpu() != graph_tokens).nonzero()
    return {"compared_tokens": new_tokens, "equal": not len(diff),
            "first_mismatch": int(diff[0]) if len(diff) else None,
            "teacher_forced": {"steps": new_tokens - 1, "argmax_agree": agree, "max_abs_logit_diff": max_diff,
                               "disagreements": flips}}


COLUMNS = {"config_id": pa.string(), "run": pa.int64(), "stage": pa.string(), "step": pa.int64(), "ms": pa.float64()}


def write_rows(rows: list[tuple], path: str | Path) -> None:
    """Per-run rows to Parquet with pyarrow (pandas is not imported in a measurement job: start-up cost)."""
    cols = list(zip(*rows)) if rows else [[] for _ in COLUMNS]
    table = pa.table({name: pa.array(col, type=t) for (name, t), col in zip(COLUMNS.items(), cols)})
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)


def run_rows(config_id: str, run: int, preprocess_ms: float, t: RunTiming) -> list[tuple]:
    rows = [(config_id, run, "preprocess", -1, preprocess_ms)]
    rows += [(config_id, run, s, -1, t.stages_ms[s]) for s in STAGES]
    rows += [(config_id, run, "e2e", -1, t.e2e_ms), (config_id, run, "unattributed", -1, t.unattributed_ms)]
    rows += [(config_id, run, "decode_step", i + 1, ms) for i, ms in enumerate(t.decode_steps_ms)]
    return rows


def measure(spec: MeasureJob, out_parquet: str | Path, out_json: str | Path) -> dict[str, Any]:
    wall = {"start": time.time()}  # wall-clock (time.time()) marks: which jobs overlapped, afterwards
    arch, knobs = variant_arch(spec)
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype)
    if knobs["decode_backend"] == "cuda_graph":
        check_graph_support(knobs, device.type, dtype)
    env = jobenv.capture(device)
    if env.get("other_gpu_processes"):
        log(f"WARNING: other processes on this GPU may perturb timings: {env['other_gpu_processes']}")
    log(f"{spec.id}: building {arch.name} ({spec.weights} weights, {spec.dtype}) on {env['device_name']}; "
        f"knobs {knobs}")
    t0 = time.perf_counter()
    model = build_for(spec, arch, knobs, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    n_new = spec.decode_tokens
    image, prompt = job_inputs(spec)
    inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)
    check_context(arch, inp.input_ids.shape[1], n_new)
    log(f"built in {build_s:.1f} s; {spec.warmup} warm-up + {spec.timed} timed runs of {n_new} new tokens")

    rows: list[tuple] = []
    tokens = []
    decoder, capture_s = None, None
    if knobs["decode_backend"] == "cuda_graph" and n_new > 1:
        decoder, capture_s = graph_decoder(model, inp, n_new)
        log(f"decode step captured in a CUDA graph in {capture_s:.2f} s (static cache of {decoder.kv.max_len} slots)")
    gc.collect()  # once: runs pause the collector, they do not collect
    load_before = hostload.snapshot()
    wall["runs_start"] = time.time()
    for run in range(-spec.warmup, spec.timed):
        t_pre = time.perf_counter()
        inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)  # timed on the host, per run
        pre_ms = (time.perf_counter() - t_pre) * 1e3
        t = timed_generate(model, inp, n_new, decoder=decoder)
        if run >= 0:
            rows += run_rows(spec.id, run, pre_ms, t)
            tokens.append(t.tokens.cpu())
        log(f"{'warm-up' if run < 0 else 'timed'} run {run if run >= 0 else run + spec.warmup}: "
            f"e2e {t.e2e_ms:.1f} ms (vision {t.stages_ms['vision_encoder']:.1f}, projector "
            f"{t.stages_ms['projector']:.1f}, prefill {t.stages_ms['prefill']:.1f}, decode {t.stages_ms['decode']:.1f})")
    wall["runs_end"] = time.time()
    load_after = hostload.snapshot()

    by_stage: dict[str, list[float]] = {}
    for _cid, _run, stage, _step, ms in rows:
        by_stage.setdefault(stage, []).append(ms)
    meta = job_meta(spec, arch, device, dtype, env)
    meta.update(convention=CONVENTION, protocol={"warmup": spec.warmup, "timed": spec.timed, "batch_size": 1},
                build_s=build_s, host_load={"before_timed_runs": load_before, "after_timed_runs": load_after})
    summary = {
        "id": spec.id,
        "variant": spec.variant,
        "knobs": knobs,
        "image": spec.image,
        "prompt": spec.prompt,
        "prompt_tokens": prompt["prompt_tokens"],
        "text_tokens": prompt["text_tokens"],
        "prompt_source": prompt["source"],
        "decode_tokens": n_new,
        "decode_steps": n_new - 1,
        "counts": {**layout.counts(), "prefill_tokens": int(inp.input_ids.shape[1])},
        "stages": {s: summarize(by_stage[s]) for s in ("preprocess", *STAGES, "e2e", "unattributed")},
        "decode_step": summarize(by_stage["decode_step"]) if n_new > 1 else None,
        "tokens_identical_across_runs": bool(all(torch.equal(tokens[0], x) for x in tokens)),
        "graph_capture_s": capture_s,
        "tokens_vs_eager_decode": compare_with_eager(tokens[0], model, inp, n_new, decoder) if decoder is not None else None,
        "meta": meta,
    }
    if device.type == "cuda":
        meta["env"]["gpu_after"] = jobenv.gpu_state(device.index or 0)
        meta["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    meta["wall_clock"] = {**wall, "end": time.time()}
    write_rows(rows, out_parquet)
    write_json(out_json, summary)
    st = summary["stages"]
    log(f"{spec.id}: e2e median {st['e2e']['median_ms']:.1f} ms; " + ", ".join(
        f"{s} {st[s]['median_ms']:.1f}" for s in STAGES) + f" (medians over {spec.timed} runs, {arch.name}, "
        f"{meta['dtype']}, {spec.weights} weights, {env['device_name']})")
    return summary
