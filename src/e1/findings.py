"""The study's four key questions answered, and its five expected findings judged, from one run's data.

Inputs: the stage latency breakdown (timed runs), the FLOPs-vs-latency JSON (analytic FLOPs/bytes, roofline)
and the attention/FFN breakdown (profiler). Every verdict states its criterion; the thresholds are below.
"""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any, Callable

from e1.crossmodel import CROSS_RULE
from e1.energy.table import read_energy
from e1.jobs.io import read_json, write_json, write_text
from e1.latency.table import read_fidelity, read_latency, routing_pairs
from e1.names import GROUP_NAMES as GROUPS
from e1.names import STAGES
from e1.profile.breakdown import BREAKDOWN_RULE, read_breakdown
from e1.roofline.flops_vs_latency import FLOPS_RULE, check_same_run, read_flops

HOLDS, FAILS = 0.8, 0.2  # share of the regime's configurations in which the condition is true
R2_WEAK, R2_STRONG = 0.5, 0.8  # log-log R² of latency on FLOPs: below WEAK = weak, at or above STRONG = strong
RULE = (f"holds if the condition is true in >= {HOLDS:.0%} of the configurations of the regime, does not hold "
        f"if in <= {FAILS:.0%}, mixed otherwise")


def verdict(fraction: float | None) -> str:
    if fraction is None:
        return "not measured"
    return "holds" if fraction >= HOLDS else "does not hold" if fraction <= FAILS else "mixed"


def shares(row: dict[str, Any]) -> dict[str, float]:
    """Each stage's share of the four stages' summed median latency."""
    ms = {s: row["stages"][s]["median_ms"] for s in STAGES}
    total = sum(ms.values())
    return {s: v / total for s, v in ms.items()}


def dominant(row: dict[str, Any]) -> str:
    sh = shares(row)
    return max(sh, key=sh.get)


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def _num(v: float | None) -> str:
    return "undefined" if v is None else f"{v:.3f}"


def _range(values: list[float]) -> str:
    return f"{_pct(min(values))}–{_pct(max(values))}" if values else "n/a"


def _fraction(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


def q1_dominant(configs: list[dict]) -> dict[str, Any]:
    counts = {s: sum(dominant(c) == s for c in configs) for s in STAGES}
    top = max(counts, key=counts.get)
    top_shares = [shares(c)[top] for c in configs if dominant(c) == top]
    others = [f"{s} in {n}" for s, n in counts.items() if s != top and n]
    text = (f"{top} is the largest of the four stages in {counts[top]} of {len(configs)} configurations "
            f"(its share of the four stages' summed median latency there: {_range(top_shares)})"
            + (f"; another stage is largest: {', '.join(others)}" if others else ""))
    return {"dominant_counts": counts, "by_config": {c["id"]: {"dominant": dominant(c), "shares": shares(c)}
                                                      for c in configs}, "text": text}


def llm_groups(components: list[dict], stage: str) -> dict[str, dict[str, float]]:
    """Per profiled configuration: each component group's share of the stage's busy device time."""
    out = {}
    for c in components:
        g = c["stages"][stage]["groups_ms"]
        busy = sum(g.values())
        out[c["id"]] = {k: g.get(k, 0.0) / busy for k in GROUPS} if busy > 0 else {}
    return out


def q2_components(components: list[dict]) -> dict[str, Any]:
    result, parts = {}, []
    for stage in ("prefill", "decode_per_token"):
        by = {cid: g for cid, g in llm_groups(components, stage).items() if g}
        if not by:
            continue
        leaders = {cid: max(g, key=g.get) for cid, g in by.items()}
        idle = [c["stages"][stage]["idle_share_timed"] for c in components if c["id"] in by]
        result[stage] = {"shares": by, "leader": leaders, "idle_share_timed": idle}
        ranges = ", ".join(f"{k} {_range([g[k] for g in by.values()])}" for k in GROUPS)
        parts.append(f"{stage}: largest group per configuration {sorted(set(leaders.values()))}; shares of busy "
                     f"device time: {ranges}; device idle during the timed {stage} (1 − busy/timed): {_range(idle)}")
    result["text"] = ("; ".join(parts) + f" ({len(components)} profiled configurations)") if parts else \
        "no profiled configuration"
    return result


def mean_shares(configs: list[dict], key: Callable[[dict], Any]) -> dict[Any, dict[str, float]]:
    """Mean stage shares per value of key(config), in key order."""
    groups: dict[Any, list[dict]] = {}
    for c in configs:
        groups.setdefault(key(c), []).append(shares(c))
    return {k: {s: sum(x[s] for x in v) / len(v) for s in STAGES} for k, v in sorted(groups.items())}


def q3_regimes(configs: list[dict]) -> dict[str, Any]:
    by_crops = mean_shares(configs, lambda c: c["counts"]["vit_crops"])
    by_n = mean_shares(configs, lambda c: c["decode_tokens"])
    regimes = {f"{c['image']} / N={c['decode_tokens']}": dominant(c) for c in configs}
    text = ("mean share of prefill by ViT crops: " + ", ".join(f"{k} crops {_pct(v['prefill'])}" for k, v in
                                                                by_crops.items())
            + "; mean share of decode by new tokens N: " + ", ".join(f"N={k} {_pct(v['decode'])}" for k, v in
                                                                     by_n.items())
            + f"; largest stage changes with the regime: {'yes' if len(set(regimes.values())) > 1 else 'no'} "
              f"({sorted(set(regimes.values()))})")
    return {"shares_by_vit_crops": by_crops, "shares_by_decode_tokens": by_n, "dominant_by_regime": regimes,
            "text": text}


def q4_flops(fl: dict[str, Any]) -> dict[str, Any]:
    f, b, r = fl["fits"]["flops"], fl["fits"]["bytes"], fl["fits"]["roofline"]
    eff_by = {s: [p["efficiency"] for p in fl["points"] if p["stage"] == s and p["efficiency"] is not None]
              for s in STAGES}
    eff = {s: median(v) for s, v in eff_by.items() if v}
    bound = {s: sum(p["bound"] == "memory" for p in fl["points"] if p["stage"] == s) for s in eff}
    inv = fl["inversions"]
    text = (f"log-log least squares of median latency on analytic FLOPs over {f['n']} (configuration, stage) points: "
            f"R² = {_num(f['r2'])}, Spearman ρ = {_num(f['spearman_rho'])}; on analytic bytes: R² = {_num(b['r2'])}, "
            f"ρ = {_num(b['spearman_rho'])}; on roofline time: R² = {_num(r['r2'])}. Median efficiency (roofline "
            "time / measured): " + ", ".join(f"{s} {_pct(v)}" for s, v in eff.items())
            + f". {len(inv)} stage pairs within a configuration run faster despite more FLOPs")
    if inv:
        i = inv[0]
        text += (f"; largest: {i['id']}, {i['more_flops']} {i['more_flops_gflop']:.4g} GFLOP in "
                 f"{i['more_flops_ms']:.3g} ms vs {i['less_flops']} {i['less_flops_gflop']:.4g} GFLOP in "
                 f"{i['less_flops_ms']:.3g} ms")
    spread = fl["equal_flops_spread"]
    if spread:
        top = max(spread, key=lambda x: x["ratio"] or 0)
        text += (f". Equal FLOPs, different implementation: up to {top['ratio']:.2f}× latency spread "
                 f"({top['stage']}, {top['image']}, N={top['decode_tokens']})")
    return {"fits": fl["fits"], "median_efficiency": eff, "memory_bound_points": bound, "inversions": len(inv),
            "largest_inversion": inv[0] if inv else None, "text": text + "."}


def expected(configs: list[dict], components: list[dict], fl: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    crops = max(c["counts"]["vit_crops"] for c in configs)
    high = [c for c in configs if c["counts"]["vit_crops"] == crops]
    frac = _fraction([dominant(c) == "prefill" for c in high])
    pre_share = [c["stages"]["prefill"]["median_ms"] / sum(c["stages"][s]["median_ms"] for s in STAGES[:3])
                 for c in high]
    out.append({"finding": "Prefill dominates for high vision token counts",
                "criterion": f"prefill is the largest of the four stages (median latency) in the configurations with "
                             f"the most ViT crops ({crops}); {RULE}",
                "fraction": frac, "verdict": verdict(frac),
                "evidence": f"prefill largest in {sum(dominant(c) == 'prefill' for c in high)} of {len(high)}; "
                            f"prefill share of all four stages {_range([shares(c)['prefill'] for c in high])}; "
                            f"of the time before decode (vision + projector + prefill) {_range(pre_share)}"})
    n_max = max(c["decode_tokens"] for c in configs)
    long_ = [c for c in configs if c["decode_tokens"] == n_max]
    frac = _fraction([dominant(c) == "decode" for c in long_])
    out.append({"finding": "Decode dominates for long generation tasks",
                "criterion": f"decode is the largest of the four stages in the configurations with the most new "
                             f"tokens (N = {n_max}); {RULE}",
                "fraction": frac, "verdict": verdict(frac),
                "evidence": f"decode largest in {sum(dominant(c) == 'decode' for c in long_)} of {len(long_)}; "
                            f"decode share {_range([shares(c)['decode'] for c in long_])}"})
    pre = {cid: g for cid, g in llm_groups(components, "prefill").items() if g}
    tokens = {c["id"]: c["counts"]["prefill_tokens"] for c in components}
    cut = median(tokens[cid] for cid in pre) if pre else 0
    longest = {cid: g for cid, g in pre.items() if tokens[cid] >= cut}
    frac = _fraction([max(g, key=g.get) == "attention" for g in longest.values()])
    out.append({"finding": "Attention dominates in prefill for long sequences (O(n²))",
                "criterion": f"attention is the largest component group of prefill busy device time (groups: "
                             f"{', '.join(GROUPS)}) in the profiled configurations with at least the median profiled "
                             f"prefill length ({cut:g} tokens); {RULE}",
                "fraction": frac, "verdict": verdict(frac),
                "evidence": "; ".join(f"{cid}: attention {_pct(g['attention'])}, FFN / MoE experts "
                                      f"{_pct(g['FFN / MoE experts'])}" for cid, g in longest.items()) or "not profiled"})
    dec = {cid: g for cid, g in llm_groups(components, "decode_per_token").items() if g}
    ffn = {cid: g["FFN / MoE experts"] + g["MoE router"] for cid, g in dec.items()}
    frac = _fraction([ffn[cid] > max(g["attention"], g["other"]) for cid, g in dec.items()])
    out.append({"finding": "FFN/MoE dominates in decode (per-token computation)",
                "criterion": f"MoE experts + router take more busy device time per decoded token than attention and "
                             f"than the other components, in each profiled configuration; {RULE}",
                "fraction": frac, "verdict": verdict(frac),
                "evidence": "; ".join(f"{cid}: experts + router {_pct(ffn[cid])}, attention {_pct(g['attention'])}"
                                      for cid, g in dec.items()) or "not profiled"})
    r2 = fl["fits"]["flops"]["r2"]
    v = "not measured" if r2 is None else "holds" if r2 < R2_WEAK else "does not hold" if r2 >= R2_STRONG else "mixed"
    out.append({"finding": "FLOPs correlation with latency is weak",
                "criterion": f"R² of the log-log least-squares fit of median latency on analytic FLOPs over all "
                             f"(configuration, stage) points: holds if < {R2_WEAK}, does not hold if >= {R2_STRONG}, "
                             "mixed otherwise; the listed causes (memory access, utilisation, parallelism, caches) are "
                             "not tested one by one",
                "fraction": None, "verdict": v, "evidence": q4_flops(fl)["text"].removesuffix(".")})
    return out


HOST_BOUND = 0.5  # a stage is host-bound when at least this share of its eager time is host overhead
SLOW_HOST = 1.25  # a host is slow when its kernel launch takes this many times the run's median launch


def launch_overhead(configs: list[dict], fl: dict[str, Any]) -> dict[str, Any]:
    """How much of each stage is host (launch) overhead, and where the GPU itself is the limit."""
    rows = [c for c in configs if c.get("host_overhead")]
    if not rows:
        return {"text": "not measured: no configuration ran with both backends (eager and cuda_graph)",
                "measured": False}
    share = {s: [r["host_overhead"]["share"][s] for r in rows if r["host_overhead"]["share"].get(s) is not None]
             for s in (*STAGES, "e2e")}
    graph_eff = {s: [p["efficiency"] for p in fl["points"] if p["stage"] == s and p["efficiency"] is not None
                     and p["knobs"].get("backend") == "cuda_graph"] for s in STAGES}
    parts = [f"{s} {_pct(median(v))} (range {_range(v)})" for s, v in share.items() if v]
    eff = [f"{s} {_pct(median(v))} of the roofline" for s, v in graph_eff.items() if v]
    text = (f"share of each eager stage that is host overhead (eager − cuda_graph twin, {len(rows)} pairs), median: "
            + ", ".join(parts) + ("; with CUDA graphs the GPU itself runs at (median roofline time / measured): "
                                  + ", ".join(eff) if eff else ""))
    return {"measured": True, "overhead_share": share, "graph_roofline_efficiency": graph_eff, "text": text}


def host_warnings(configs: list[dict]) -> list[str]:
    """Host-bound stages of configurations whose host was slow or loaded (see HOST_BOUND, SLOW_HOST)."""
    launches = [c["host_bench"]["launch_us"] for c in configs if (c.get("host_bench") or {}).get("launch_us")]
    ref = median(launches) if launches else None
    out = []
    for c in configs:
        bound = [s for s, v in ((c.get("host_overhead") or {}).get("share") or {}).items()
                 if s in STAGES and v is not None and v >= HOST_BOUND]
        if not bound:
            continue
        why = []
        launch = (c.get("host_bench") or {}).get("launch_us")
        if ref and launch and launch > SLOW_HOST * ref:
            why.append(f"kernel launch {launch:.1f} µs vs the run's median {ref:.1f} µs")
        why += [f for f in c.get("flags", []) if f.startswith("host busy")]
        if why:
            out.append(f"{c['id']}: host-bound {', '.join(bound)} on a slow or loaded host ({'; '.join(why)})")
    return out


def fidelity_check(items: list[dict]) -> dict[str, Any]:
    """e1's prefill + decode against transformers' generate() (rule fidelity)."""
    if not items:
        return {"text": "not measured (no eager variant, or no fidelity check in this run)", "items": []}
    ratios = [i["ratio_e1_over_generate"] for i in items]
    ok = sum(i["within_target"] for i in items)
    equal = sum(i["tokens_equal"] for i in items)
    text = (f"e1 / generate() time, median of interleaved pairs: {', '.join(f'{r:.3f}' for r in ratios)} "
            f"({ok} of {len(items)} within ±5 %); tokens equal in {equal} of {len(items)}; experts e1 "
            f"{items[0]['experts_used']['e1']}, generate() {items[0]['experts_used']['generate']}")
    return {"text": text, "items": [{k: i[k] for k in ("id", "decode_tokens", "e1_median_ms", "generate_median_ms",
                                                       "ratio_e1_over_generate", "within_target", "tokens_equal")}
                                    for i in items]}


def expert_load(configs: list[dict]) -> dict[str, Any]:
    """How evenly the experts were loaded (e1.model.routing), and what imbalance costs at equal FLOPs."""
    parts, out = [], {"by_mode": {}, "pairs": []}
    for mode in ("learned", "balanced"):
        rows = [c for c in configs if c.get("routing") and c["knobs"]["moe_routing"] == mode]
        if not rows:
            continue
        stats = {}
        for ph in ("prefill", "decode"):
            got = [c["routing"][ph] for c in rows if c["routing"].get(ph)]
            if got:
                mm = [g["max_over_mean"]["mean"] for g in got]
                share = [g["busiest8_share"]["mean"] for g in got]
                stats[ph] = {"max_over_mean": mm, "busiest8_share": share}
                parts.append(f"{mode} routing, {ph}: busiest expert / mean {median(mm):.2f} (median over "
                             f"{len(got)} configurations of the mean over layers; range {_range(mm)}), busiest 8 of "
                             f"the experts take {_pct(median(share))} of the routed slots")
        out["by_mode"][mode] = stats
    if not parts:
        return {**out, "text": "not recorded (summaries without routing counts)"}
    for learned, balanced in routing_pairs(configs):
        pair = {"id": learned["id"], "balanced_id": balanced["id"]}
        for s in ("prefill", "decode"):
            pair[f"{s}_ms"] = {"learned": learned["stages"][s]["median_ms"], "balanced": balanced["stages"][s]["median_ms"]}
            b = pair[f"{s}_ms"]["balanced"]
            pair[f"{s}_learned_over_balanced"] = pair[f"{s}_ms"]["learned"] / b if b > 0 else None
        out["pairs"].append(pair)
    for s in ("prefill", "decode"):
        ratios = [p[f"{s}_learned_over_balanced"] for p in out["pairs"] if p[f"{s}_learned_over_balanced"]]
        if ratios:
            parts.append(f"{s} time learned / balanced at equal FLOPs: {median(ratios):.2f} (median of "
                         f"{len(ratios)} pairs; range {_range(ratios)})")
    return {**out, "text": "; ".join(parts) + ". A perfectly even layer has busiest / mean 1 and its busiest 8 "
                           "experts take 8/E of the slots; all tokens on the same k experts gives E/k"}


def energy_vs_time(energy: dict[str, Any], configs: list[dict]) -> dict[str, Any]:
    """Which stage dominates a request's energy (net of idle), and whether it is the one that dominates its time."""
    rows = [r for r in energy["configs"] if r["measured"]]
    if not rows:
        return {"measured": False, "text": f"not measured ({energy['meta']['reason']})"}
    by_id = {c["id"]: c for c in configs}
    items, differ = [], 0
    for r in rows:
        j = {s: v["per_request_net_j"] for s, v in r["stages"].items()}
        e_share = {s: v / sum(j.values()) for s, v in j.items()}
        t_share = shares(by_id[r["id"]])
        e_dom, t_dom = max(e_share, key=e_share.get), max(t_share, key=t_share.get)
        differ += e_dom != t_dom
        items.append({"id": r["id"], "energy_dominant": e_dom, "time_dominant": t_dom, "energy_share": e_share,
                      "time_share": t_share, "j_per_request_net": r["request"]["net"]["j_per_request"],
                      "j_per_token_net": r["request"]["net"]["j_per_token"]})
    count: dict[str, int] = {}
    for i in items:
        count[i["energy_dominant"]] = count.get(i["energy_dominant"], 0) + 1
    per_token = [i["j_per_token_net"] for i in items]
    text = ("energy (net of idle) is dominated by " + ", ".join(f"{s} in {n}" for s, n in
                                                               sorted(count.items(), key=lambda kv: -kv[1]))
            + f" of {len(items)} configurations; the energy-dominant stage differs from the time-dominant one in "
            f"{differ} of {len(items)}; J per generated token above idle: median {median(per_token):.3g} "
            f"(range {_range(per_token)})")
    return {"measured": True, "text": text, "differ": differ, "items": items}


def across_models(table: dict[str, Any] | None) -> dict[str, Any]:
    """The cross-model comparison (rule cross_model): per backend, each model's dominant stage and median decode
    step, and how often more FLOPs ran in less time."""
    if table is None:
        return {"measured": False, "text": "not part of this run (no cross-model table)"}
    rows, inv = table["configs"], table["inversions"]
    parts = []
    for backend in sorted({r["backend"] for r in rows}):
        per = []
        for m in table["meta"]["models"]:
            mine = [r for r in rows if r["model"] == m and r["backend"] == backend]
            if not mine:
                continue
            dom = {max(STAGES, key=lambda s: r["ms"][s]) for r in mine}
            steps = [r["decode_step_ms"] for r in mine if r["decode_step_ms"] is not None]
            share = [r["share"]["decode"] for r in mine]
            per.append(f"{m}: {'/'.join(sorted(dom))} dominates (decode {_range(share)} of the four stages), "
                       f"decode step {min(steps):.2f}–{max(steps):.2f} ms" if steps else "")
        n_inv = sum(1 for i in inv if i["backend"] == backend)
        pairs = sum(1 for _ in rows if _["backend"] == backend)
        parts.append(f"backend {backend}: " + "; ".join(per) + f"; {n_inv} (stage, image, model pair) cases where "
                     f"the model with more FLOPs ran faster, over {pairs} configurations")
    text = (f"{', '.join(table['meta']['models'])} on {table['meta']['device']} ({table['meta']['dtype']}, "
            f"{'/'.join(table['meta']['weights'])} weights): " + " | ".join(parts))
    return {"measured": True, "text": text, "inversions": len(inv)}


def render(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = ["# E1 findings", "",
             f"Run: {m['model']} on {m['device']} ({m['device_type']}), {m['dtype']}, {m['weights']} weights, "
             f"prompt ids: {m.get('token_ids', 'not recorded')}, "
             f"torch {m['torch']}; {m['protocol']['timed']} timed runs after {m['protocol']['warmup']} warm-up, "
             f"batch size 1. Knobs (all configurations pooled): {'; '.join(m['knobs'])}.", "",
             "Conventions: " + "; ".join(m["conventions"].values()), ""]
    if m["model"].endswith("-tiny"):
        lines += [f"**{m['model']} is a scaled-down stand-in: these numbers are not "
                  f"{m['model'].removesuffix('-tiny')}'s.**", ""]
    lines += ["## Key questions", ""]
    titles = ("Which stages dominate end-to-end latency?", "Within the LLM stages, which sub-components dominate?",
              "How does stage dominance change across input regimes?", "Why do FLOPs not predict latency?",
              "Which stage dominates energy, and is it the one that dominates time?")
    for i, (title, q) in enumerate(zip(titles, result["questions"].values()), 1):
        lines += [f"{i}. **{title}** {q['text']}", ""]
    lines += ["## Expected findings", ""]
    for i, f in enumerate(result["expected_findings"], 1):
        lines += [f"{i}. **{f['finding']}: {f['verdict']}.** Criterion: {f['criterion']}. Evidence: {f['evidence']}.",
                  ""]
    lines += ["## What the host costs", "", f"- Launch overhead: {result['launch_overhead']['text']}.",
              f"- e1 against transformers' generate(): {result['fidelity']['text']}.",
              f"- The study's own cost: {result['job_cost_text']}.", ""]
    lines += ["## Expert load", "", f"{result['expert_load']['text']}.", ""]
    lines += ["## Across models", "", f"{result['across_models']['text']}.", ""]
    flagged = result["flagged_configurations"]
    lines += ["## Measurements to doubt", "", f"Rule: {m['flag_rule']}.", ""]
    lines += [f"- {cid}: {'; '.join(why)}" for cid, why in flagged.items()] or ["- none"]
    lines += ["", f"Host-bound stages on a slow or loaded host (host-bound: >= {HOST_BOUND:.0%} of the eager stage "
                  f"is host overhead; slow: kernel launch > {SLOW_HOST}x the run's median):", ""]
    lines += [f"- {w}" for w in result["host_warnings"]] or ["- none"]
    return "\n".join(lines)


def job_cost_text(cost: dict[str, Any] | None) -> str:
    if not cost or not cost.get("outside_runs_s"):
        return "not recorded"
    o, g = cost["outside_runs_s"], cost.get("gap_between_jobs_s")
    return (f"measure jobs spent {o['median']:.1f} s (median; {o['min']:.1f}–{o['max']:.1f}) outside their warm-up "
            f"and timed runs; {cost['runs_s_total']:.0f} s of runs in {cost['jobs_s_total']:.0f} s of jobs"
            + (f"; {g['median']:.1f} s (median) between one job's end and the next one's start" if g else ""))


def findings(latency_json: str | Path, flops_json: str | Path, components_json: str | Path | None,
             fidelity_jsons: list[str | Path], out_md: str | Path, out_json: str | Path,
             energy_json: str | Path, cross_model_json: str | Path | None = None) -> dict[str, Any]:
    """Answer the questions and judge the expectations; write Markdown and JSON.

    components_json None: nothing was profiled (e.g. every variant decodes with CUDA graphs); the component
    questions and findings are then reported as not measured.
    """
    bd = read_latency(latency_json)
    fl = read_flops(flops_json)
    comp = read_breakdown(components_json) if components_json else \
        {"meta": {**bd["meta"], "convention": "nothing profiled"}, "configs": []}
    meta, configs = bd["meta"], bd["configs"]
    keys = ("model", "device_type", "dtype")
    check_same_run(meta, fl["meta"], f"FLOPs vs latency {flops_json}", keys, FLOPS_RULE)
    check_same_run(meta, comp["meta"], f"component breakdown {components_json}", keys, BREAKDOWN_RULE)
    result = {
        "meta": {**{k: meta[k] for k in ("model", "device", "device_type", "dtype", "weights", "torch", "protocol")},
                 "token_ids": meta.get("token_ids"),
                 "knobs": sorted({", ".join(f"{k}={v}" for k, v in p["knobs"].items()) for p in fl["points"]}),
                 "flag_rule": meta.get("flag_rule", "no flags recorded"),
                 "conventions": {"timing": meta["convention"], "components": comp["meta"]["convention"],
                                 "flops": fl["meta"]["convention"],
                                 "shares": "a stage's share = its median latency / the sum of the four stages' "
                                           "medians; 'dominates' = the largest share"}},
        "questions": {"q1_dominant_stage": q1_dominant(configs), "q2_llm_components": q2_components(comp["configs"]),
                      "q3_regimes": q3_regimes(configs), "q4_flops": q4_flops(fl),
                      "q5_energy": energy_vs_time(read_energy(energy_json), configs)},
        "expected_findings": expected(configs, comp["configs"], fl),
        "flagged_configurations": {c["id"]: c["flags"] for c in configs if c.get("flags")},
        "launch_overhead": launch_overhead(configs, fl),
        "host_warnings": host_warnings(configs),
        "expert_load": expert_load(configs),
        "fidelity": fidelity_check([read_fidelity(f) for f in fidelity_jsons]),
        "job_cost_text": job_cost_text(meta.get("job_cost")),
        "across_models": across_models(read_json(cross_model_json, CROSS_RULE) if cross_model_json else None),
    }
    write_json(out_json, result)
    write_text(out_md, render(result) + "\n")
    return result
