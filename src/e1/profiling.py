"""One profile job: torch.profiler trace of a configuration with named stage/component ranges.

Separate from the measure job, so the profiler never perturbs the latencies we report. Profiled runs
generate min(N, max_decode_steps + 1) tokens: the decode breakdown is reported per token.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from e1 import envinfo
from e1.components import component_ranges
from e1.device import resolve_device
from e1.measure import build_for, log, prepare, resolve_knobs
from e1.model.molmoe import MolmoE
from e1.names import RUN_RANGE
from e1.preprocess import load_image
from e1.timing import StageInputs, timed_generate


REQUIRED = ("id", "model", "device", "dtype", "weights", "seed", "image", "image_path", "prompt", "prompt_path",
            "decode_tokens", "warmup", "profile_runs", "max_decode_steps")


@torch.inference_mode()
def expert_routing(model: MolmoE, inp: StageInputs) -> pd.DataFrame:
    """Tokens routed to each expert in each layer during one prefill (from the routers' top-k choices)."""
    counts: list[torch.Tensor] = []
    n_experts = model.arch.llm["num_experts"]

    def hook(_module, _args, out):  # router returns (logits, top-k weights, top-k indices)
        counts.append(torch.bincount(out[2].reshape(-1), minlength=n_experts).cpu())

    handles = [layer.mlp.gate.register_forward_hook(hook) for layer in model.llm.layers]
    try:
        feats = model.encode_images(inp.crops)
        model.prefill(inp.input_ids, model.project(feats, inp.patch_masks), inp.feature_index, inp.token_position)
    finally:
        for h in handles:
            h.remove()
    rows = [(layer, e, int(c[e])) for layer, c in enumerate(counts) for e in range(n_experts)]
    return pd.DataFrame(rows, columns=["layer", "expert", "tokens"])


def profile_config(spec: dict[str, Any], out_trace: str | Path, out_json: str | Path,
                   out_routing: str | Path) -> dict[str, Any]:
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"profile spec lacks {missing}; required: {list(REQUIRED)}")
    arch, knobs = resolve_knobs(spec)
    if knobs["decode_backend"] != "eager":
        raise ValueError(f"decode_backend {knobs['decode_backend']!r}: profiles need per-module ranges, which a "
                         "graph replay does not show; allowed: eager")
    device = resolve_device(spec["device"])
    env = envinfo.capture(device)
    model = build_for(spec, arch, knobs, device)
    dtype = next(model.parameters()).dtype
    prompt = json.loads(Path(spec["prompt_path"]).read_text())
    inp, layout = prepare(arch, load_image(spec["image_path"]), prompt["text_ids"], device, dtype)
    n_new = min(int(spec["decode_tokens"]), int(spec["max_decode_steps"]) + 1)
    log(f"{spec['id']}: profiling {spec['profile_runs']} runs of {n_new} new tokens "
        f"(config asks {spec['decode_tokens']}) after {spec['warmup']} warm-up runs")
    for _ in range(int(spec["warmup"])):
        timed_generate(model, inp, n_new)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    runs = []
    with component_ranges(model):
        timed_generate(model, inp, n_new, annotate=True)  # warm the annotated path too
        t0 = time.perf_counter()
        with profile(activities=acts, record_shapes=False, with_stack=False) as prof:
            for k in range(int(spec["profile_runs"])):
                with record_function(f"{RUN_RANGE}{k}"):
                    t = timed_generate(model, inp, n_new, annotate=True)
                runs.append({"run": k, "e2e_ms": t.e2e_ms, "stages_ms": t.stages_ms,
                             "decode_steps_ms": t.decode_steps_ms})
        profiled_s = time.perf_counter() - t0
    Path(out_trace).parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out_trace))  # Kineto JSON; gzipped when the name ends in .gz
    routing = expert_routing(model, inp)
    routing.to_parquet(out_routing, index=False)
    summary = {
        "id": spec["id"], "variant": spec.get("variant"), "knobs": knobs, "image": spec["image"], "prompt": spec["prompt"], "decode_tokens": int(spec["decode_tokens"]),
        "profiled_new_tokens": n_new, "profiled_decode_steps": n_new - 1,
        "counts": {**layout.counts(), "prefill_tokens": int(inp.input_ids.shape[1])},
        "profiled_runs": runs, "profiled_wall_s": profiled_s,
        "meta": {"model": arch.name, "weights": spec["weights"], "device": env["device_name"],
                 "device_type": device.type, "dtype": str(dtype).removeprefix("torch."),
                 "torch": env["torch"], "transformers": env["transformers"], "env": env},
    }
    Path(out_json).write_text(json.dumps(summary, indent=1) + "\n")
    log(f"{spec['id']}: trace written to {out_trace} ({Path(out_trace).stat().st_size / 2**20:.1f} MiB)")
    return summary
