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
from e1.arch import Arch, load_arch
from e1.device import resolve_device
from e1.model.build import build_model, resolve_dtype
from e1.model.graph_decode import DECODE_BACKENDS, StaticDecoder, check_graph_support
from e1.model.molmoe import MolmoE
from e1.preprocess import build_input_ids, check_context, load_image, preprocess
from e1.stats import summarize
from e1.names import STAGES
from e1.timing import CONVENTION, RunTiming, StageInputs, timed_generate

REQUIRED = ("id", "model", "device", "dtype", "weights", "seed", "image", "image_path", "prompt", "prompt_path",
            "decode_tokens", "warmup", "timed")


def log(msg: str) -> None:
    print(f"[e1 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def resolve_knobs(spec: dict[str, Any]) -> tuple[Arch, dict[str, Any]]:
    """The configuration's architecture (top-k, max_crops applied) and its knobs, every one spelled out."""
    arch = load_arch(spec["model"]).with_knobs(moe_top_k=spec.get("moe_top_k"), max_crops=spec.get("max_crops"))
    backend = spec.get("decode_backend", "eager")
    if backend not in DECODE_BACKENDS:
        raise ValueError(f"decode_backend {backend!r}; allowed: {', '.join(DECODE_BACKENDS)}")
    return arch, {
        "attn_implementation": spec.get("attn_implementation", "sdpa"),
        "experts_implementation": spec.get("experts_implementation", "grouped_mm"),
        "decode_backend": backend,
        "moe_top_k": arch.llm["top_k"],
        "max_crops": arch.preprocess["max_crops"],
    }


def build_for(spec: dict[str, Any], arch: Arch, knobs: dict[str, Any], device: torch.device) -> MolmoE:
    return build_model(arch, device=str(device), dtype=spec["dtype"], weights=spec["weights"], seed=spec["seed"],
                       attn_implementation=knobs["attn_implementation"],
                       experts_implementation=knobs["experts_implementation"])


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
        raise ValueError(f"measure spec lacks {missing}; required: {list(REQUIRED)}")
    wall = {"start": time.time()}  # wall-clock (time.time()) marks: which jobs overlapped, afterwards
    arch, knobs = resolve_knobs(spec)
    device = resolve_device(spec["device"])
    if knobs["decode_backend"] == "cuda_graph":
        check_graph_support(device.type, knobs["attn_implementation"], knobs["experts_implementation"],
                            resolve_dtype(spec["dtype"]))
    env = envinfo.capture(device)
    if env.get("other_gpu_processes"):
        log(f"WARNING: other processes on this GPU may perturb timings: {env['other_gpu_processes']}")
    log(f"{spec['id']}: building {arch.name} ({spec['weights']} weights, {spec['dtype']}) on {env['device_name']}; "
        f"knobs {knobs}")
    t0 = time.perf_counter()
    model = build_for(spec, arch, knobs, device)
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
    decoder, capture_s = None, None
    if knobs["decode_backend"] == "cuda_graph" and n_new > 1:
        decoder, capture_s = graph_decoder(model, prepare(arch, image, prompt["text_ids"], device, dtype)[0], n_new)
        log(f"decode step captured in a CUDA graph in {capture_s:.2f} s (static cache of {decoder.kv.max_len} slots)")
    gc.collect()  # once: runs pause the collector, they do not collect
    wall["runs_start"] = time.time()
    for run in range(-int(spec["warmup"]), int(spec["timed"])):
        t_pre = time.perf_counter()
        inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)
        pre_ms = (time.perf_counter() - t_pre) * 1e3
        if run == -int(spec["warmup"]):
            check_context(arch, inp.input_ids.shape[1], n_new)
        t = timed_generate(model, inp, n_new, decoder=decoder)
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
        "variant": spec.get("variant"),
        "knobs": knobs,
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
        "graph_capture_s": capture_s,
        "tokens_vs_eager_decode": compare_with_eager(tokens[0], model, inp, n_new, decoder) if decoder is not None else None,
        "meta": {
            "model": arch.name,
            "weights": spec["weights"],
            "seed": spec["seed"],
            "device": env["device_name"],
            "device_type": device.type,
            "dtype": str(dtype).removeprefix("torch."),
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

