"""The sweep axes ("knobs"): their defaults, allowed values, and which combinations can run.

One table, read by the Snakemake rules while they plan (torch is not imported here) and by the package in
every job, so a default or a rule about combinations is written once. Every combination of the configured
values is a *variant*, named `attn.experts.backend.k<top-k>.c<max_crops>.<routing>` (e.g.
sdpa.auto.eager.k8.c12.learned).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from e1.model.arch import Arch

MAX_CROPS = 64  # the most image tiles a run may allow (Molmo's own default is 12)


@dataclass(frozen=True)
class Axis:
    """One knob: its default (None = the model's own value) and its allowed values (None = an integer range)."""

    default: Any
    allowed: tuple[str, ...] | None
    what: str


AXES: dict[str, Axis] = {
    "attn_implementation": Axis("sdpa", ("sdpa", "eager", "flash_attention_2"),
                                "how attention runs (flash_attention_2 where installed); FLOPs equal"),
    "experts_implementation": Axis("auto", ("auto", "grouped_mm", "batched_mm", "eager"),
                                   "how transformers runs the MoE experts; auto = what generate() runs: the "
                                   "library's default for prefill, its decode policy for decode (e.g. batched_mm on "
                                   "a GPU); an explicit value pins both stages; FLOPs equal"),
    "backend": Axis("eager", ("eager", "cuda_graph"),
                    "how the request is launched: eager, or every stage (vision encoder, projector, prefill, each "
                    "decode step) captured once as a CUDA graph and replayed (cuda only); FLOPs equal"),
    "moe_top_k": Axis(None, None, "experts per token: null = the model's own, else 1..num_experts; FLOPs change"),
    "max_crops": Axis(None, None, f"image tiles allowed: null = the model's own, else 1..{MAX_CROPS}; "
                                  "vision FLOPs and image tokens change"),
    "moe_routing": Axis("learned", ("learned", "balanced"),
                        "which experts the tokens go to: learned = the router's top-k choice; balanced = the router "
                        "still runs but the ids are assigned round-robin so every expert gets the same number "
                        "of tokens (e1/model/routing.py); FLOPs equal"),
}
# Knobs that change the work (FLOPs, bytes) against knobs that change only how the same work is executed.
WORK_KNOBS = ("moe_top_k", "max_crops")
IMPL_KNOBS = ("attn_implementation", "experts_implementation", "backend", "moe_routing")
# What a CUDA-graph-captured decode step can run with.
GRAPH_ATTN = ("sdpa", "eager")  # flash_attention_2 takes no additive mask over a static cache
GRAPH_EXPERTS = ("auto", "grouped_mm", "batched_mm")  # transformers' eager experts loop syncs with the host


NOT_APPLICABLE = {"moe_top_k": 0, "max_crops": 1}  # what a resolved knob reads where it does not apply


def applies(key: str, arch: Arch) -> bool:
    """Whether knob `key` means anything for `arch`: the MoE knobs need routed experts, max_crops Molmo's tiling
    (e1.vlm.families). A knob that does not apply stays at its default (a dense model's top-k reads k0, a model
    without tiling c1: one image, whole)."""
    from e1.vlm.families import family

    fam = family(arch)
    if key in ("moe_top_k", "moe_routing", "experts_implementation"):
        return fam.moe
    if key == "max_crops":
        return fam.crops
    return True


def _int_range(key: str, arch: Arch) -> tuple[int, int]:
    return (1, arch.llm["num_experts"]) if key == "moe_top_k" else (1, MAX_CROPS)


def check_value(key: str, value: Any, arch: Arch) -> None:
    """Raise naming the knob, the value and what is allowed."""
    if key not in AXES:
        raise ValueError(f"unknown knob {key!r}; knobs: {', '.join(AXES)}")
    axis = AXES[key]
    if axis.allowed is not None:
        if value not in axis.allowed:
            raise ValueError(f"{key} {value!r}; allowed: {', '.join(axis.allowed)}")
        return
    if value is None:
        return
    low, high = _int_range(key, arch)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        what = f" ({arch.name} has {high} experts)" if key == "moe_top_k" else ""
        raise ValueError(f"{key} {value!r}; allowed: null (the model's own) or an integer from {low} to {high}{what}")


def resolve(values: Mapping[str, Any], arch: Arch) -> dict[str, Any]:
    """Every knob spelled out: given values, defaults for the rest, None replaced by the model's own value."""
    unknown = sorted(set(values) - set(AXES))
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown}; knobs: {', '.join(AXES)}")
    knobs = {}
    for key, axis in AXES.items():
        value = values.get(key, axis.default)
        if not applies(key, arch):
            if value not in (axis.default, NOT_APPLICABLE.get(key)):
                raise ValueError(f"{key} {value!r}: {arch.name} has {_missing(key)}; leave it at "
                                 f"{axis.default if axis.default is not None else 'null'}")
        else:
            check_value(key, value, arch)
        knobs[key] = value
    for key, na in NOT_APPLICABLE.items():
        if not applies(key, arch):
            knobs[key] = na
    if knobs["moe_top_k"] is None:
        knobs["moe_top_k"] = arch.llm["top_k"]
    if knobs["max_crops"] is None:
        knobs["max_crops"] = arch.preprocess["max_crops"]
    return knobs


def _missing(key: str) -> str:
    return "no tiling (one image, whole)" if key == "max_crops" else "a dense LLM (no experts)"


def applicable(config: Mapping[str, Any], arch: Arch) -> tuple[dict[str, Any], list[str]]:
    """The configured knob values with those that do not apply to `arch` set to their default, and a note for
    each configured value so dropped."""
    kept, notes = {}, []
    for key, axis in AXES.items():
        value = config.get(key, axis.default)
        values = value if isinstance(value, list) else [value]
        if applies(key, arch) or all(v == axis.default for v in values):
            kept[key] = value
        else:
            kept[key] = axis.default
            notes.append(f"{arch.name}: {key} {value!r} left out: {arch.name} has {_missing(key)}")
    return kept, notes


def problem(knobs: Mapping[str, Any], device_type: str, dtype: str) -> str | None:
    """Why a resolved combination of knobs cannot run on `device_type` in `dtype` (None when it can)."""
    if knobs["backend"] != "cuda_graph":
        return None
    if device_type != "cuda":
        return f"backend cuda_graph needs device cuda; this run's device is {device_type!r}"
    if knobs["attn_implementation"] not in GRAPH_ATTN:
        return (f"backend cuda_graph with attn_implementation {knobs['attn_implementation']!r}; "
                f"allowed: {', '.join(GRAPH_ATTN)}")
    if knobs["experts_implementation"] not in GRAPH_EXPERTS:
        return (f"backend cuda_graph with experts_implementation {knobs['experts_implementation']!r} (its "
                f"loop over the experts hit syncs with the host); allowed: {', '.join(GRAPH_EXPERTS)}")
    if knobs["experts_implementation"] in ("auto", "grouped_mm") and dtype != "bfloat16":
        # seen on the H200 with torch 2.11: torch._grouped_mm outside bfloat16 copies its offsets to the host;
        # auto runs grouped_mm in prefill
        return (f"backend cuda_graph with {knobs['experts_implementation']} experts in {dtype} (grouped_mm, which "
                "auto runs in prefill, copies its offsets to the host outside bfloat16); allowed: bfloat16, or "
                "batched_mm experts")
    return None


def variant_name(knobs: Mapping[str, Any]) -> str:
    """attn.experts.backend.k<top-k>.c<max_crops>.<routing>, e.g. sdpa.auto.eager.k8.c12.learned."""
    return (f"{knobs['attn_implementation']}.{knobs['experts_implementation']}.{knobs['backend']}"
            f".k{knobs['moe_top_k']}.c{knobs['max_crops']}.{knobs['moe_routing']}")


def grid(config: Mapping[str, Any], arch: Arch, device_type: str, dtype: str
         ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Every combination of the configured knob values (each one value or a list) that apply to `arch`.

    Returns ({variant name: knobs} that can run, ["<variant>: why not", ...] that cannot). A bad value is an
    error naming the knob; a grid where nothing can run is an error listing why.
    """
    config, left_out = applicable(config, arch)
    lists = {k: (v if isinstance(v, list) else [v]) for k, v in
             ((key, config.get(key, axis.default)) for key, axis in AXES.items())}
    variants: dict[str, dict[str, Any]] = {}
    for combo in itertools.product(*lists.values()):
        knobs = resolve(dict(zip(lists, combo)), arch)
        why = problem(knobs, device_type, dtype)
        if why:
            left_out.append(f"{variant_name(knobs)}: {why}")
        else:
            variants[variant_name(knobs)] = knobs
    if not variants:
        raise ValueError("no runnable variant: " + "; ".join(left_out))
    return variants, left_out
