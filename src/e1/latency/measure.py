"""One measurement job (rule measure): build the model once, warm up, time one configuration, write
its per-run rows (Parquet) and its summary (JSON)."""

from __future__ import annotations

import gc
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

import e1
from e1.jobs import env as jobenv
from e1.energy.gpu_state import GpuStateSampler
from e1.energy.stages import job_energy, sensors_for
from e1.jobs import hostbench, hostload
from e1.jobs.io import atomic_path, write_json
from e1.jobs.log import log
from e1.jobs.runtime import build_for, job_inputs, job_meta, resolve_job
from e1.jobs.spec import MeasureJob
from e1.latency.stats import summarize
from e1.latency.memory import stage_memory
from e1.latency.timing import CONVENTION, RunTiming, timed_generate
from e1.model.graphs import GraphedRequest, compare_with_eager
from e1.model.preprocess import check_context
from e1.model.routing import BUSIEST, expert_load
from e1.model.stage_inputs import prepare
from e1.names import STAGES


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


def by_stage_ms(rows: list[tuple], stage: str) -> list[float]:
    """The ms of every row of one stage (or 'decode_step'), in run order."""
    return [ms for _cid, _run, s, _step, ms in rows if s == stage]


GPU_STATE_INTERVAL_S = 0.1  # NVML sampling period during the timed runs (its calls release the GIL)
COMPARE_TOKENS = 33  # the cuda_graph guard compares the first min(N, 33) tokens (prefill + 32 decode steps)


def job_time(marks: dict[str, float]) -> dict[str, Any]:
    """A job's life: wall-clock marks (time.time()), the seconds between consecutive ones, and the seconds
    outside its warm-up and timed runs (from the job's shell start to its end)."""
    order = sorted(marks.items(), key=lambda kv: kv[1])
    steps = {f"{a}->{b}": round(tb - ta, 3) for (a, ta), (b, tb) in zip(order, order[1:])}
    total = marks["end"] - marks.get("shell_start", marks["python_start"])
    runs = marks["runs_end"] - marks["runs_start"]
    return {"marks": marks, "steps_s": steps, "total_s": round(total, 3), "runs_s": round(runs, 3),
            "outside_runs_s": round(total - runs, 3)}


def measure(spec: MeasureJob, out_parquet: str | Path, out_json: str | Path) -> dict[str, Any]:
    marks = {"python_start": e1.IMPORTED_AT, "measure_start": time.time()}
    if os.environ.get("E1_JOB_STARTED"):
        marks["shell_start"] = float(os.environ["E1_JOB_STARTED"])
    arch, knobs, device, dtype = resolve_job(spec)
    graphed = knobs["backend"] == "cuda_graph"
    if device.type == "cuda":
        torch.zeros(1, device=device)  # CUDA context
        marks["cuda_ready"] = time.time()
    pool = ThreadPoolExecutor(1)  # nvidia-smi readings (subprocesses) while the model builds
    env_future = pool.submit(jobenv.capture, device)
    log(f"{spec.id}: building {arch.name} ({spec.weights} weights, {spec.dtype}); knobs {knobs}")
    t0 = time.perf_counter()
    model = build_for(spec, arch, knobs, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    marks["model_built"] = time.time()
    env = env_future.result()
    marks["env_captured"] = time.time()
    if env.get("other_gpu_processes"):
        log(f"WARNING: other processes on this GPU may perturb timings: {env['other_gpu_processes']}")
    n_new = spec.decode_tokens
    image, prompt = job_inputs(spec)
    inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)
    check_context(arch, inp.input_ids.shape[1], n_new)
    log(f"built in {build_s:.1f} s; {spec.warmup} warm-up + {spec.timed} timed runs of {n_new} new tokens")

    graphs, capture_s = None, None
    if graphed:
        graphs = GraphedRequest(model, inp, n_new)
        capture_s = graphs.capture()
        marks["graphs_captured"] = time.time()
        log(f"every stage captured in a CUDA graph in {capture_s:.2f} s (static cache of {graphs.kv.max_len} slots)")
    bench = hostbench.host_bench(device)
    sensors, no_sensors = sensors_for(device)
    gpu_state = GpuStateSampler(sensors, interval_s=GPU_STATE_INTERVAL_S, reason=no_sensors)
    gc.collect()  # once: runs pause the collector, they do not collect
    load_before = hostload.snapshot()
    rows: list[tuple] = []
    tokens, experts = [], {}
    marks["runs_start"] = time.time()
    during_timed = ExitStack()
    for run in range(-spec.warmup, spec.timed):
        if run == 0:
            during_timed.enter_context(gpu_state)  # sampled during the timed runs only
        t_pre = time.perf_counter()
        inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)  # timed on the host, per run
        pre_ms = (time.perf_counter() - t_pre) * 1e3
        t = timed_generate(model, inp, n_new, graphs=graphs)
        if run >= 0:
            rows += run_rows(spec.id, run, pre_ms, t)
            tokens.append(t.tokens.cpu())
            experts = t.experts
        log(f"{'warm-up' if run < 0 else 'timed'} run {run if run >= 0 else run + spec.warmup}: "
            f"e2e {t.e2e_ms:.1f} ms (vision {t.stages_ms['vision_encoder']:.1f}, projector "
            f"{t.stages_ms['projector']:.1f}, prefill {t.stages_ms['prefill']:.1f}, decode {t.stages_ms['decode']:.1f})")
    during_timed.close()
    marks["runs_end"] = time.time()
    after_future = pool.submit(jobenv.gpu_state, device.index or 0) if device.type == "cuda" else None
    load_after = hostload.snapshot()
    compared = compare_with_eager(tokens[0], model, inp, min(n_new, COMPARE_TOKENS), graphs) if graphed else None
    memory = stage_memory(model, inp, n_new, graphs)
    routing = {"mode": knobs["moe_routing"], **expert_load(model, inp, n_new)}
    log(f"expert load ({knobs['moe_routing']} routing, one untimed request): " + "; ".join(
        f"{ph} max/mean {routing[ph]['max_over_mean']['mean']:.2f} (mean over layers), busiest {BUSIEST} experts "
        f"{routing[ph][f'busiest{BUSIEST}_share']['mean']:.0%} of slots" for ph in ("prefill", "decode")
        if routing[ph]))
    marks["checks_done"] = time.time()
    medians = {s: statistics.median(by_stage_ms(rows, s)) for s in STAGES[:3]}
    if n_new > 1:
        medians["decode"] = statistics.median(by_stage_ms(rows, "decode_step"))
    energy = job_energy(model, inp, n_new, graphs, sensors, no_sensors, medians, spec.energy, log)
    marks["energy_done"] = time.time()

    by_stage = {stage: by_stage_ms(rows, stage) for stage in {r[2] for r in rows}}
    meta = job_meta(spec, model, device, dtype, env, prompt)
    meta.update(convention=CONVENTION, protocol={"warmup": spec.warmup, "timed": spec.timed, "batch_size": 1},
                build_s=build_s, host_load={"before_timed_runs": load_before, "after_timed_runs": load_after},
                host_bench={**bench, "cpu": env["cpu"], "loadavg_before": load_before["loadavg"]})
    summary = {
        "id": spec.id,
        "variant": spec.variant,
        "knobs": knobs,
        "experts_used": experts,
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
        "graph_vs_eager": compared,
        "memory": memory,
        "routing": routing,
        "gpu_state": gpu_state.summary(),
        "energy": energy,
        "meta": meta,
    }
    if after_future is not None:
        meta["env"]["gpu_after"] = after_future.result()
        meta["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    pool.shutdown()
    write_rows(rows, out_parquet)
    marks["end"] = time.time()
    meta["wall_clock"] = {"start": marks["measure_start"], "runs_start": marks["runs_start"],
                          "runs_end": marks["runs_end"], "end": marks["end"]}
    meta["job_time"] = job_time(marks)
    write_json(out_json, summary)
    st = summary["stages"]
    log(f"{spec.id}: e2e median {st['e2e']['median_ms']:.1f} ms; " + ", ".join(
        f"{s} {st[s]['median_ms']:.1f}" for s in STAGES) + f" (medians over {spec.timed} runs, {arch.name}, "
        f"{meta['dtype']}, {spec.weights} weights, {env['device_name']}; experts {experts}); job "
        f"{meta['job_time']['total_s']:.1f} s, {meta['job_time']['outside_runs_s']:.1f} s outside the runs")
    return summary
