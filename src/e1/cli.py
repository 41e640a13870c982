"""Command line: `e1 describe | check-config | image | measure | fidelity | stage-latency | plot-stack |
stage-energy | plot-energy | plot-routing | cross-model | plot-cross-model | profile | parse-trace | breakdown | plot-breakdown | calibrate |
flop-check | flops-vs-latency | plot-flops | plot-scaling | findings`. The workflow's rules call these; model
jobs read their spec from a file."""

from __future__ import annotations

import argparse
import json
import sys


def _describe(a: argparse.Namespace) -> None:
    from e1.describe import describe, render_table

    d = describe(a.model, a.image, a.prompt_tokens, a.decode_tokens, moe_top_k=a.moe_top_k, max_crops=a.max_crops)
    print(json.dumps(d, indent=1) if a.json else render_table(d))


def _check_config(a: argparse.Namespace) -> None:
    from e1.configfile import load_config_file

    for path in a.files:
        load_config_file(path)
        print(f"{path}: readable UTF-8 YAML")


def _image(a: argparse.Namespace) -> None:
    from e1.inputs.images import parse_size, write_image

    write_image(a.out, *parse_size(a.size), seed=a.seed)


def _device_job(path: str, kind: str):
    """A model job's spec (checked); claims the job's device first: a free GPU for `cuda` (before anything
    touches CUDA), the host's CPU-measurement lock for `cpu` (e1.jobs.claims)."""
    from e1.jobs.claims import claim_for
    from e1.jobs.spec import KINDS, load

    spec = load(path, KINDS[kind])
    claim_for(spec.device)
    return spec


def _measure(a: argparse.Namespace) -> None:
    spec = _device_job(a.spec, "measure")
    from e1.latency.measure import measure

    measure(spec, a.out_parquet, a.out_json)


def _stage_latency(a: argparse.Namespace) -> None:
    from e1.latency.table import stage_latency

    stage_latency(a.summaries, a.out)


def _plot_stack(a: argparse.Namespace) -> None:
    from e1.plots.stack import plot_stack

    plot_stack(a.latency, a.out)


def _profile(a: argparse.Namespace) -> None:
    spec = _device_job(a.spec, "profile")
    from e1.profile.capture import profile_config

    profile_config(spec, a.out_trace, a.out_json, a.out_routing)


def _parse_trace(a: argparse.Namespace) -> None:
    from e1.profile.breakdown import parse

    parse(a.trace, a.profile, a.routing, a.out_components, a.out_stages, a.out_kernels, a.out_json)


def _breakdown(a: argparse.Namespace) -> None:
    from e1.profile.breakdown import study_breakdown

    study_breakdown(a.summaries, a.kernels, a.measured, a.out)


def _stage_energy(a: argparse.Namespace) -> None:
    from e1.energy.table import energy_table

    energy_table(a.latency, a.out)


def _plot_energy(a: argparse.Namespace) -> None:
    from e1.plots.energy import plot_energy

    plot_energy(a.energy, a.out)


def _cross_model(a: argparse.Namespace) -> None:
    from e1.crossmodel import cross_model

    cross_model(a.summaries, a.out)


def _plot_cross_model(a: argparse.Namespace) -> None:
    from e1.plots.cross_model import plot_cross_model

    plot_cross_model(a.table, a.out)


def _plot_routing(a: argparse.Namespace) -> None:
    from e1.plots.routing import plot_routing

    plot_routing(a.latency, a.out)


def _plot_breakdown(a: argparse.Namespace) -> None:
    from e1.plots.breakdown import plot_breakdown

    plot_breakdown(a.breakdown, a.out)


def _fidelity(a: argparse.Namespace) -> None:
    spec = _device_job(a.spec, "fidelity")
    from e1.latency.fidelity import fidelity

    fidelity(spec, a.out)


def _calibrate(a: argparse.Namespace) -> None:
    spec = _device_job(a.spec, "calibrate")
    from e1.roofline.calibrate import calibrate

    calibrate(spec.device, spec.dtype, a.out)


def _flop_check(a: argparse.Namespace) -> None:
    spec = _device_job(a.spec, "flop_check")
    from e1.roofline.flopcheck import flop_check

    flop_check(spec, a.out)


def _flops_vs_latency(a: argparse.Namespace) -> None:
    from e1.roofline.flops_vs_latency import build

    build(a.latency, a.calibrate, a.flop_checks, a.out)


def _plot_flops(a: argparse.Namespace) -> None:
    from e1.plots.flops import plot_flops

    plot_flops(a.flops, a.out)


def _plot_scaling(a: argparse.Namespace) -> None:
    from e1.plots.scaling import plot_scaling

    plot_scaling(a.latency, a.parquets, a.out)


def _findings(a: argparse.Namespace) -> None:
    from e1.findings import findings

    findings(a.latency, a.flops, a.components, a.fidelity, a.out_md, a.out_json, a.energy, a.cross_model)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="e1", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("describe", help="explain a configuration (counts, parameters) without running it")
    d.add_argument("--model", default="molmoe-1b")
    d.add_argument("--image", required=True, help="WIDTHxHEIGHT, e.g. 1008x784")
    d.add_argument("--prompt-tokens", type=int, default=20, help="prompt length in tokens (template excluded)")
    d.add_argument("--decode-tokens", type=int, default=1, help="new tokens (1 prefill + N-1 decode steps)")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table")
    d.add_argument("--moe-top-k", type=int, default=None, help="experts per token (default: the model's)")
    d.add_argument("--max-crops", type=int, default=None, help="image tiles allowed (default: the model's)")
    d.set_defaults(func=_describe)

    cc = sub.add_parser("check-config", help="say where a config file is not UTF-8 YAML (file, line, column)")
    cc.add_argument("files", nargs="+")
    cc.set_defaults(func=_check_config)

    i = sub.add_parser("image", help="write a deterministic synthetic RGB image (PNG)")
    i.add_argument("--size", required=True, help="WIDTHxHEIGHT")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--out", required=True)
    i.set_defaults(func=_image)

    m = sub.add_parser("measure", help="time one configuration (stage API, events, one sync per run)")
    m.add_argument("--spec", required=True, help="the job's spec file (JSON, written by rule spec)")
    m.add_argument("--out-parquet", required=True)
    m.add_argument("--out-json", required=True)
    m.set_defaults(func=_measure)

    g = sub.add_parser("stage-latency", help="gather measure summaries into the stage latency table (JSON)")
    g.add_argument("--out", required=True)
    g.add_argument("summaries", nargs="+")
    g.set_defaults(func=_stage_latency)

    s = sub.add_parser("plot-stack", help="stacked stage bars from the stage latency table")
    s.add_argument("--latency", required=True, help="e1_stage_latency_breakdown.json")
    s.add_argument("--out", required=True)
    s.set_defaults(func=_plot_stack)

    se = sub.add_parser("stage-energy", help="every configuration's energy per stage (JSON), from the latency table")
    se.add_argument("--latency", required=True, help="e1_stage_latency_breakdown.json")
    se.add_argument("--out", required=True)
    se.set_defaults(func=_stage_energy)

    pe = sub.add_parser("plot-energy", help="stacked joules per request by stage")
    pe.add_argument("--energy", required=True, help="e1_stage_energy.json")
    pe.add_argument("--out", required=True)
    pe.set_defaults(func=_plot_energy)

    cm = sub.add_parser("cross-model", help="every model's stages and analytic FLOPs at one regime (JSON)")
    cm.add_argument("--out", required=True)
    cm.add_argument("summaries", nargs="+", help="measure summaries (JSON) of every model")
    cm.set_defaults(func=_cross_model)

    pc = sub.add_parser("plot-cross-model", help="stages per model, and latency against FLOPs across models")
    pc.add_argument("--table", required=True, help="e1_cross_model.json")
    pc.add_argument("--out", required=True)
    pc.set_defaults(func=_plot_cross_model)

    rt = sub.add_parser("plot-routing", help="expert load per configuration, learned against balanced routing")
    rt.add_argument("--latency", required=True, help="e1_stage_latency_breakdown.json")
    rt.add_argument("--out", required=True)
    rt.set_defaults(func=_plot_routing)

    pr = sub.add_parser("profile", help="torch.profiler trace of one configuration with stage/component ranges")
    pr.add_argument("--spec", required=True, help="the job's spec file (JSON, written by rule spec)")
    pr.add_argument("--out-trace", required=True, help="Kineto trace (.json.gz)")
    pr.add_argument("--out-json", required=True)
    pr.add_argument("--out-routing", required=True, help="tokens per expert per layer in prefill (Parquet)")
    pr.set_defaults(func=_profile)

    pt = sub.add_parser("parse-trace", help="attribute a trace's device time to stages and components")
    pt.add_argument("--trace", required=True)
    pt.add_argument("--profile", required=True, help="the profile job's JSON")
    pt.add_argument("--routing", required=True)
    pt.add_argument("--out-components", required=True)
    pt.add_argument("--out-stages", required=True)
    pt.add_argument("--out-kernels", required=True, help="LLM kernel time by stage, component and name (Parquet)")
    pt.add_argument("--out-json", required=True)
    pt.set_defaults(func=_parse_trace)

    b = sub.add_parser("breakdown", help="gather per-configuration component breakdowns into one JSON")
    b.add_argument("--out", required=True)
    b.add_argument("--summaries", nargs="+", required=True, help="parse-trace summaries (JSON)")
    b.add_argument("--kernels", nargs="+", required=True, help="parse-trace kernel tables, one per summary")
    b.add_argument("--measured", nargs="*", default=[], help="measure summaries (for profiled vs timed)")
    b.set_defaults(func=_breakdown)

    pb = sub.add_parser("plot-breakdown", help="attention/FFN/router/other/idle bars from the component breakdown")
    pb.add_argument("--breakdown", required=True, help="e1_attention_ffn_breakdown.json")
    pb.add_argument("--out", required=True)
    pb.set_defaults(func=_plot_breakdown)

    fi = sub.add_parser("fidelity", help="e1's prefill + decode loop against transformers' generate() (JSON)")
    fi.add_argument("--spec", required=True, help="the job's spec file (JSON, written by rule spec)")
    fi.add_argument("--out", required=True)
    fi.set_defaults(func=_fidelity)

    c = sub.add_parser("calibrate", help="measured matmul TFLOP/s and copy bandwidth of the device (roofline)")
    c.add_argument("--spec", required=True, help="the job's spec file (JSON: device, dtype)")
    c.add_argument("--out", required=True)
    c.set_defaults(func=_calibrate)

    fc = sub.add_parser("flop-check", help="analytic FLOPs vs torch's FlopCounterMode on the stage calls")
    fc.add_argument("--spec", required=True, help="the job's spec file (JSON, written by rule spec)")
    fc.add_argument("--out", required=True)
    fc.set_defaults(func=_flop_check)

    fl = sub.add_parser("flops-vs-latency", help="FLOPs, bytes, roofline and measured latency per stage (JSON)")
    fl.add_argument("--latency", required=True, help="e1_stage_latency_breakdown.json")
    fl.add_argument("--calibrate", required=True, help="the run's calibrate.json")
    fl.add_argument("--flop-checks", nargs="*", default=[], help="flop-check JSONs")
    fl.add_argument("--out", required=True)
    fl.set_defaults(func=_flops_vs_latency)

    pf = sub.add_parser("plot-flops", help="FLOPs vs latency scatter with roofline")
    pf.add_argument("--flops", required=True, help="e1_flops_vs_latency.json")
    pf.add_argument("--out", required=True)
    pf.set_defaults(func=_plot_flops)

    ps = sub.add_parser("plot-scaling", help="prefill/decode scaling curves and per-step decode latency")
    ps.add_argument("--latency", required=True, help="e1_stage_latency_breakdown.json")
    ps.add_argument("--parquets", nargs="+", required=True, help="per-configuration measure Parquet files")
    ps.add_argument("--out", required=True)
    ps.set_defaults(func=_plot_scaling)

    fd = sub.add_parser("findings", help="the study's key questions and expected findings, from this run")
    fd.add_argument("--latency", required=True, help="e1_stage_latency_breakdown.json")
    fd.add_argument("--flops", required=True, help="e1_flops_vs_latency.json")
    fd.add_argument("--energy", required=True, help="e1_stage_energy.json")
    fd.add_argument("--components", nargs="?", help="e1_attention_ffn_breakdown.json (absent: nothing profiled)")
    fd.add_argument("--fidelity", nargs="*", default=[], help="fidelity JSONs (e1 against generate())")
    fd.add_argument("--cross-model", help="e1_cross_model.json (absent: no comparison across models)")
    fd.add_argument("--out-md", required=True)
    fd.add_argument("--out-json", required=True)
    fd.set_defaults(func=_findings)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"e1 {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
