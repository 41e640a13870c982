"""One profile job: torch.profiler trace of a configuration with named stage/component ranges.

Separate from the measure job, so the profiler never perturbs the latencies we report. Profiled runs
generate min(N, max_decode_steps + 1) tokens: the decode breakdown is reported per token.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from e1.jobs import env as jobenv
from e1.jobs.io import atomic_path, write_json
from e1.jobs.log import log
from e1.jobs.runtime import build_for, job_inputs, job_meta, resolve_job
from e1.jobs.spec import ProfileJob
from e1.latency.timing import timed_generate
from e1.model.graphs import GraphedRequest
from e1.model.routing import expert_load
from e1.model.stage_inputs import prepare
from e1.names import RUN_RANGE
from e1.profile.ranges import component_ranges


def expert_routing(model: nn.Module, inp: Any) -> pa.Table:
    """Tokens routed to each expert in each layer during one prefill (e1.model.routing.expert_load)."""
    counts = expert_load(model, inp, 1)["prefill"]["counts"]
    n_experts = len(counts[0])
    return pa.table({"layer": pa.array([k for k in range(len(counts)) for _ in range(n_experts)], pa.int64()),
                     "expert": pa.array([e for _ in counts for e in range(n_experts)], pa.int64()),
                     "tokens": pa.array([c[e] for c in counts for e in range(n_experts)], pa.int64())})


def profile_config(spec: ProfileJob, out_trace: str | Path, out_json: str | Path,
                   out_routing: str | Path) -> dict[str, Any]:
    arch, knobs, device, dtype = resolve_job(spec)
    graphed = knobs["backend"] == "cuda_graph"
    env = jobenv.capture(device)
    model = build_for(spec, arch, knobs, device)
    image, prompt = job_inputs(spec)
    inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)
    n_new = min(spec.decode_tokens, spec.max_decode_steps + 1)
    log(f"{spec.id}: profiling {spec.runs} runs of {n_new} new tokens (config asks {spec.decode_tokens}) after "
        f"{spec.warmup} warm-up runs")
    graphs = None
    if graphed:  # replays show their kernels under the stage ranges only: components come from kernel names
        graphs = GraphedRequest(model, inp, n_new)
        graphs.capture()
    for _ in range(spec.warmup):
        timed_generate(model, inp, n_new, graphs=graphs)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runs = []
    with nullcontext() if graphed else component_ranges(model):
        timed_generate(model, inp, n_new, annotate=True, graphs=graphs)  # warm the annotated path too
        t0 = time.perf_counter()
        with profile(activities=acts, record_shapes=False, with_stack=False) as prof:
            for k in range(spec.runs):
                with record_function(f"{RUN_RANGE}{k}"):
                    t = timed_generate(model, inp, n_new, annotate=True, graphs=graphs)
                runs.append({"run": k, "e2e_ms": t.e2e_ms, "stages_ms": t.stages_ms,
                             "decode_steps_ms": t.decode_steps_ms})
        profiled_s = time.perf_counter() - t0
    with atomic_path(out_trace, suffix=".json.gz") as tmp:
        prof.export_chrome_trace(str(tmp))  # Kineto JSON, gzipped (the name ends in .gz)
    with atomic_path(out_routing, suffix=".parquet") as tmp:
        pq.write_table(expert_routing(model, inp), tmp)
    summary = {
        "id": spec.id, "variant": spec.variant, "knobs": knobs, "image": spec.image, "prompt": spec.prompt,
        "decode_tokens": spec.decode_tokens, "profiled_new_tokens": n_new, "profiled_decode_steps": n_new - 1,
        "counts": {**layout.counts(), "prefill_tokens": int(inp.input_ids.shape[1])},
        "profiled_runs": runs, "profiled_wall_s": profiled_s,
        "component_source": "kernel names (graph replays)" if graphed else "profiler ranges",
        "meta": job_meta(spec, model, device, dtype, env, prompt),
    }
    write_json(out_json, summary)
    log(f"{spec.id}: trace written to {out_trace} ({Path(out_trace).stat().st_size / 2**20:.1f} MiB)")
    return summary
