"""Where a CUDA-graph decode step's time goes: replay latency and the kernels inside one replay.

Full MolmoE-1B (random bf16 weights) on the GPU, 1008x784 image + short prompt, decode after the prefill.
For each experts implementation: median replay ms over `--steps` replays (CUDA events around each), and
the device time of the kernels of 5 replays by kernel name (torch.profiler), so the gap to the HBM floor
can be attributed. Writes JSON; prints a summary. Usage: python benchmarks/graph_probe.py --out probe.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from e1.model.arch import load_arch
from e1.inputs.images import synthetic_image
from e1.inputs.prompts import make_prompt
from e1.model.stage_inputs import prepare
from e1.model.build import build_model
from e1.model.graph_decode import StaticDecoder
from e1.latency.timing import timed_generate


def probe(experts: str, steps: int) -> dict:
    arch = load_arch("molmoe-1b")
    dev = torch.device("cuda")
    model = build_model(arch, device="cuda", dtype="bfloat16", experts_implementation=experts)
    ids = make_prompt(arch, "short", 16, None, None)["text_ids"]
    inp, _ = prepare(arch, synthetic_image(1008, 784), ids, dev, torch.bfloat16)
    dec = StaticDecoder(model, max_len=inp.input_ids.shape[1] + steps + 8)
    timed_generate(model, inp, 2, decoder=dec)
    capture_s = dec.capture()
    timed_generate(model, inp, 2, decoder=dec)  # restart from a fresh prefill
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
    ev[0].record()
    for i in range(steps):
        dec.graph.replay()
        ev[i + 1].record()
    torch.cuda.synchronize()
    ms = [a.elapsed_time(b) for a, b in zip(ev, ev[1:])]
    timed_generate(model, inp, 2, decoder=dec)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            dec.graph.replay()
        torch.cuda.synchronize()
    by_kernel: dict[str, float] = defaultdict(float)
    n_kernels = 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            by_kernel[e.name] += e.device_time / 5 / 1e3  # ms per replay
            n_kernels += 1
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:15]
    return {"experts_implementation": experts, "capture_s": capture_s, "replay_ms_median": statistics.median(ms),
            "replay_ms_min": min(ms), "kernel_ms_per_replay": sum(by_kernel.values()),
            "kernels_per_replay": n_kernels / 5, "top_kernels_ms": top}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    results = []
    for experts in ("grouped_mm", "batched_mm"):
        r = probe(experts, args.steps)
        results.append(r)
        print(f"{experts}: replay median {r['replay_ms_median']:.3f} ms (min {r['replay_ms_min']:.3f}), "
              f"kernels {r['kernel_ms_per_replay']:.3f} ms/step, capture {r['capture_s']:.2f} s", flush=True)
        for name, ms in r["top_kernels_ms"][:8]:
            print(f"   {ms:7.3f} ms  {name[:110]}")
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results},
                  open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
