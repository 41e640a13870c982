"""Cross-check of e1.roofline.flops against torch's FlopCounterMode on the real stage calls of one configuration.

Per stage (vision encoder, projector, prefill, first decode step): analytic FLOPs, counted FLOPs, their
ratio, the counted FLOPs by op, and the matrix-product ops that ran but that FlopCounterMode has no formula
for (it counts them as zero: e.g. the CPU scaled-dot-product attention). aten._grouped_mm, the MoE experts
on the default path, has no formula in torch; e1 gives the counter one (grouped_mm_flops). The ops that ran
are recorded by a TorchDispatchMode placed outside the counter, so it sees the ops the counter decomposes
composite calls into.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from e1.jobs.io import write_json
from e1.jobs.runtime import build_for, job_inputs, resolve_job
from e1.jobs.spec import FlopCheckJob
from e1.model.arch import Arch
from e1.model.stage_inputs import prepare
from e1.roofline import flops

# Ops whose name says they multiply matrices (matmul, conv, attention, dot products): arithmetic the
# analytic convention counts. Elementwise ops are not matrix products and are left out on purpose.
CONTRACTION = re.compile(r"mm|conv|attention|matmul|linear|einsum|dot")
CONVENTION = ("analytic: e1.roofline.flops (2 per multiply-add, matrix products only, causal prefill attention, top-k "
              "experts); counted: torch.utils.flop_counter.FlopCounterMode on the same stage call; ratio = "
              "analytic / counted; aten._grouped_mm counted by e1's formula (2 x rows used x K x N); zero_counted_ops: "
              "matrix-product ops that ran (TorchDispatchMode) without a FlopCounterMode formula, with their call "
              "counts")


class OpRecorder(TorchDispatchMode):
    """Counts the ATen ops that reach the dispatcher while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def grouped_mm_flops(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor | None = None, *args: Any,
                     out_val: Any = None, **kwargs: Any) -> int:
    """FLOPs of aten._grouped_mm (2 per multiply-add), from its tensors (offs says how many rows were used).

    a (M, K) x b (G, K, N), offs (G,) = end row of each group: 2 * offs[-1] * K * N (rows past the last
    offset are not computed); a (G, M, K) x b (G, K, N): 2 * G * M * K * N; a (M, K) x b (K, N) grouped
    along K by offs: 2 * M * offs[-1] * N; a (G, M, K) x b (K, N) is grouped like the 3D x 3D case.
    """
    if a.dim() == 2 and b.dim() == 3:
        rows = int(offs[-1]) if offs is not None else a.shape[0]
        return 2 * rows * a.shape[1] * b.shape[2]
    if a.dim() == 2 and b.dim() == 2:
        depth = int(offs[-1]) if offs is not None else a.shape[1]
        return 2 * a.shape[0] * depth * b.shape[1]
    groups, m, k = a.shape
    return 2 * groups * m * k * b.shape[-1]


grouped_mm_flops._get_raw = True  # FlopCounterMode: pass the tensors (offs' values), not only their shapes
COUNTED_BY_E1 = {torch.ops.aten._grouped_mm: grouped_mm_flops}


def zero_counted(calls: Counter) -> dict[str, int]:
    """Matrix-product ops among `calls` that FlopCounterMode counts as zero (no formula), with call counts."""
    return {str(op): n for op, n in sorted(calls.items(), key=lambda kv: str(kv[0]))
            if op not in flop_registry and op not in COUNTED_BY_E1 and CONTRACTION.search(str(op).removeprefix("aten."))}


def count(fn: Callable[[], Any]) -> tuple[Any, dict[str, Any]]:
    """Run fn under an op recorder and FlopCounterMode (with e1's formulas); returns fn's result and the counts."""
    with OpRecorder() as rec, FlopCounterMode(display=False, custom_mapping=COUNTED_BY_E1) as fc:
        out = fn()
    by_op = {str(op): int(n) for op, n in fc.get_flop_counts().get("Global", {}).items()}
    return out, {"counted": int(fc.get_total_flops()), "counted_by_op": by_op,
                 "zero_counted_ops": zero_counted(rec.calls)}


def compare(analytic: dict[str, int], counted: dict[str, Any]) -> dict[str, Any]:
    """One stage's row: analytic components and total, counted, ratio analytic/counted (None if 0 counted)."""
    total = sum(analytic.values())
    ratio = total / counted["counted"] if counted["counted"] else None
    return {"analytic": total, "analytic_components": analytic, **counted, "ratio": ratio}


@torch.inference_mode()
def check_stages(model: nn.Module, arch: Arch, inp: Any, layout: Any) -> dict[str, dict[str, Any]]:
    """Every stage once, counted; analytic FLOPs from the same counts."""
    t = int(inp.input_ids.shape[1])
    feats, vis = count(lambda: model.stage_vision(inp))
    embeds, proj = count(lambda: model.stage_projector(feats, inp))
    (logits, cache), pre = count(lambda: model.stage_prefill(inp, embeds))
    token = logits.argmax(-1, keepdim=True)
    _, dec = count(lambda: model.decode_step(token, cache))
    want = flops.stage_flops(arch, {**layout.counts(), "prefill_tokens": t})  # decode: context = prefill tokens
    counted = {"vision_encoder": vis, "projector": proj, "prefill": pre, "decode_step": dec}
    return {stage: compare({k: n for k, n in want[stage].items() if k != "total"}, c) for stage, c in counted.items()}


def flop_check(spec: FlopCheckJob, out_json: str | Path) -> dict[str, Any]:
    """Build the model of `spec` with its knobs (as a measure job does), check every stage, write the JSON.

    The decode step runs eagerly whatever the spec's backend: a CUDA-graph replay hides its ops.
    """
    arch, knobs, device, dtype = resolve_job(spec)
    model = build_for(spec, arch, knobs, device)
    image, prompt = job_inputs(spec)
    inp, layout = prepare(arch, image, prompt["text_ids"], device, dtype)
    stages = check_stages(model, arch, inp, layout)
    result = {
        "image": spec.image,
        "prompt": spec.prompt,
        "variant": spec.variant,
        "knobs": knobs,
        "prefill_tokens": int(inp.input_ids.shape[1]),
        "stages": stages,
        "zero_counted_ops": sorted({op for s in stages.values() for op in s["zero_counted_ops"]}),
        "meta": {
            "model": arch.name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "device_type": device.type, "dtype": str(dtype).removeprefix("torch."), "weights": spec.weights,
            "torch": torch.__version__,
            "convention": CONVENTION,
        },
    }
    write_json(out_json, result)
    return result
