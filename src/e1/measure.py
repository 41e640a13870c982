"""One measurement job: build the model once, warm up, time one configuration, write Parquet + JSON."""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from e1 import envinfo
from e1.arch import load_arch
from e1.model.build import build_model
from e1.preprocess import build_input_ids, check_context, load_image, preprocess
from e1.stats import summarize
from e1.timing import CONVENTION, STAGES, RunTiming, StageInputs, timed_generate

REQUIRED = ("id", "model", "device", "dtype", "weights", "seed", "image", "image_path", "prompt", "prompt_path",
            "decode_tokens", "warmup", "timed")


def log(msg: str) -> None:
    print(f"[e1 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resolve_device(name: str) -> torch.device:
    """'cuda' must really be a GPU: never fall back to the CPU silently."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {name!r} was requested but torch {torch.__version__} sees no CUDA GPU "
            "(is this a GPU node? CUDA_VISIBLE_DEVICES?); refusing to measure on the CPU instead"
        )
    return device


def prepare(arch, image, text_ids: list[int], device: torch.device, dtype: torch.dtype) -> tuple[StageInputs, Any]:
    """CPU preprocessing + host-to-device copies; returns inputs ready for the timed run."""
    pp = preprocess(arch, image)
    ids = build_input_ids(arch, pp.layout, text_ids)
    inp = StageInputs(
        crops=torch.from_numpy(pp.crops).to(device=device, dtype=dtype),
        patch_masks=torch.from_numpy(pp.patch_masks).to(device=device, dtype=dtype),
        input_ids=torch.from_numpy(ids)[None].to(device),
        feature_index=torch.from_numpy(pp.layout.feature_index).to(device),
        token_position=torch.from_numpy(pp.layout.token_position).to(device),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    return inp, pp.layout


COLUMNS = {"config_id": pa.string(), "run": pa.int64(), "stage": pa.string(), "step": pa.int64(), "ms": pa.float64()}


def write_rows(rows: list[tuple], path: str | Path) -> None:
    """Per-run rows to Parquet with pyarrow (pandas is not imported in a measurement job: start-up cost)."""
    cols = list(zip(*rows)) if rows else [[] for _ in COLUMNS]
    table = pa.table({name: pa.array(col, type=t) for (name, t), col in zip(COLUMNS.items(), cols)})
    pq.write_table(table, path)


def run_rows(config_id: str, run: int, preprocess_ms: float, t: RunTiming) -> list[tuple]:
    rows = [(config_id, run, "preprocess", -1, preprocess_ms)]
    rows += [(config_id, run, s, -1, t.stages_ms[s]) for s in STAGES]
    rows += [(config_id, run, "e2e", -1, t.e2e_ms), (config_id, run, "unattributed", -1, t.unattributed_ms)]
    rows += [(config_id, run, "decode_step", i + 1, ms) for i, ms in enumerate(t.decode_steps_ms)]
    return rows


def measure(spec: dict[str, Any], out_parquet: str | Path, out_json: str | Path) -> dict[str, Any]:
    missing = [k for k in REQUIRED if k not in spec]
    if missing:
        raise ValueError(f"measure spec lacks {missing}")
    wall = {"start": time.time()}  # wall-clock (time.time()) marks: which jobs overlapped, afterwards
    arch = load_arch(spec["model"])
    device = resolve_device(spec["device"])
    env = envinfo.capture(device)
    if env.get("other_gpu_processes"):
        log(f"WARNING: other processes on this GPU may perturb timings: {env['other_gpu_processes']}")
    log(f"{spec['id']}: building {arch.name} ({spec['weights']} weights, {spec['dtype']}) on {env['device_name']}")
    t0 = time.perf_counter()
    model = build_model(arch, device=str(device), dtype=spec["dtype"], weights=spec["weights"], seed=spec["seed"],
                        attn_implementation=spec.get("attn_implementation", "sdpa"),
                        experts_implementation=spec.get("experts_implementation", "grouped_mm"))
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    dtype = next(model.parameters()).dtype
    image = load_image(spec["image_path"])
    prompt = json.loads(Path(spec["prompt_path"]).read_text())
    n_new = int(spec["decode_tokens"])
    log(f"built in {build_s:.1f} s; {spec['warmup']} warm-up + {spec['timed']} timed runs of {n_new} new tokens")

    rows: list[tuple] = []
    tokens = []
    layout = None
    gc.collect()  # once: runs pause the collector, they do not collect
    wall["runs_start"] = time.time()
    for run in range(-int(spec["warmup"]), int(spec["timed"])):
        t_pre = time.perf_counter()
        inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)
        pre_ms = (time.perf_counter() - t_pre) * 1e3
        if run == -int(spec["warmup"]):
            check_context(arch, inp.input_ids.shape[1], n_new)
        t = timed_generate(model, inp, n_new)
        if run >= 0:
            rows += run_rows(spec["id"], run, pre_ms, t)
            tokens.append(t.tokens.cpu())
        log(f"{'warm-up' if run < 0 else 'timed'} run {run if run >= 0 else run + int(spec['warmup'])}: "
            f"e2e {t.e2e_ms:.1f} ms (vision {t.stages_ms['vision_encoder']:.1f}, projector "
            f"{t.stages_ms['projector']:.1f}, prefill {t.stages_ms['prefill']:.1f}, decode {t.stages_ms['decode']:.1f})")

    wall["runs_end"] = time.time()
    by_stage: dict[str, list[float]] = {}
    for _cid, _run, stage, _step, ms in rows:
        by_stage.setdefault(stage, []).append(ms)
    prefill_tokens = int(inp.input_ids.shape[1])
    summary = {
        "id": spec["id"],
        "image": spec["image"],
        "prompt": spec["prompt"],
        "prompt_tokens": prompt["prompt_tokens"],
        "text_tokens": prompt["text_tokens"],
        "decode_tokens": n_new,
        "decode_steps": n_new - 1,
        "counts": {**layout.counts(), "prefill_tokens": prefill_tokens},
        "stages": {s: summarize(by_stage[s]) for s in ("preprocess", *STAGES, "e2e", "unattributed")},
        "decode_step": summarize(by_stage["decode_step"]) if n_new > 1 else None,
        "tokens_identical_across_runs": bool(all(torch.equal(tokens[0], x) for x in tokens)),
        "meta": {
            "model": arch.name,
            "weights": spec["weights"],
            "seed": spec["seed"],
            "device": env["device_name"],
            "device_type": device.type,
            "dtype": str(dtype).removeprefix("torch."),
            "attn_implementation": spec.get("attn_implementation", "sdpa"),
            "experts_implementation": spec.get("experts_implementation", "grouped_mm"),
            "torch": env["torch"],
            "transformers": env["transformers"],
            "convention": CONVENTION,
            "protocol": {"warmup": int(spec["warmup"]), "timed": int(spec["timed"]), "batch_size": 1},
            "build_s": build_s,
            "env": env,
        },
    }
    if device.type == "cuda":
        summary["meta"]["env"]["gpu_after"] = envinfo.gpu_state(device.index or 0)
        summary["meta"]["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    summary["meta"]["wall_clock"] = {**wall, "end": time.time()}
    Path(out_parquet).parent.mkdir(parents=True, exist_ok=True)
    write_rows(rows, out_parquet)
    Path(out_json).write_text(json.dumps(summary, indent=1) + "\n")
    st = summary["stages"]
    log(f"{spec['id']}: e2e median {st['e2e']['median_ms']:.1f} ms; " + ", ".join(
        f"{s} {st[s]['median_ms']:.1f}" for s in STAGES) + f" (medians over {spec['timed']} runs, {arch.name}, "
        f"{summary['meta']['dtype']}, {spec['weights']} weights, {env['device_name']})")
    return summary

