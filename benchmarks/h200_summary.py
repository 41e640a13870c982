"""Print one line per measure summary of a results/<run> directory: stage medians, experts used, graph check,
start-up cost; then the medians of the jobs' cost outside their runs. Usage: h200_summary.py RESULTS_RUN_DIR"""

import json
import statistics
import sys
from pathlib import Path

rows, outside = [], []
for f in sorted(Path(sys.argv[1]).glob("measure/*.json")):
    s = json.loads(f.read_text())
    st, jt = s["stages"], s["meta"].get("job_time") or {}
    check = s.get("graph_vs_eager") or {}
    outside.append(jt.get("outside_runs_s", float("nan")))
    print(f"{s['id']}: vis {st['vision_encoder']['median_ms']:.2f} proj {st['projector']['median_ms']:.2f} "
          f"pre {st['prefill']['median_ms']:.2f} dec/step {(s['decode_step'] or {}).get('median_ms', 0):.3f} "
          f"e2e {st['e2e']['median_ms']:.1f} ms; experts {s.get('experts_used')}; graph equal {check.get('equal')} "
          f"within tol {check.get('logits_within_tolerance')}; job {jt.get('total_s')} s, outside runs "
          f"{jt.get('outside_runs_s')} s; launch {s['meta'].get('host_bench', {}).get('launch_us')} us")
    rt = s.get("routing") or {}
    for ph in ("prefill", "decode"):
        if rt.get(ph):
            print(f"  {rt['mode']} routing {ph}: busiest/mean {rt[ph]['max_over_mean']['mean']:.2f} (worst layer "
                  f"{rt[ph]['max_over_mean']['max']:.2f}), busiest 8 {rt[ph]['busiest8_share']['mean']:.1%}, experts "
                  f"hit {rt[ph]['experts_hit']['mean']:.1f} of {len(rt[ph]['counts'][0])}")
    en = s.get("energy") or {}
    if en.get("measured"):
        print("  energy J/call net (gross): " + ", ".join(
            f"{k} {v['net_j_per_call']['median']:.3f} ({v['gross_j_per_call']['median']:.3f})"
            for k, v in en["stages"].items()) + f"; per token net {en['request']['net']['j_per_token']:.3f} J; "
            f"counter {en['counter']['median_ms']:.1f} ms")
    elif en:
        print(f"  energy: {en.get('reason')}")
    gs = s.get("gpu_state") or {}
    if gs.get("measured"):
        print(f"  GPU state: SM {gs['sm_clock_mhz']}, power W {gs['power_w']}, flagged "
              f"{gs['flagged']} {gs['throttle_reasons']}")
if outside:
    print(f"{len(outside)} jobs: outside runs median {statistics.median(outside):.2f} s, min {min(outside):.2f}, "
          f"max {max(outside):.2f}")
    steps = {}
    for f in sorted(Path(sys.argv[1]).glob("measure/*.json")):
        for k, v in (json.loads(f.read_text())["meta"].get("job_time") or {}).get("steps_s", {}).items():
            steps.setdefault(k, []).append(v)
    print("median seconds per step: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in steps.items()))
for f in sorted(Path(sys.argv[1]).glob("fidelity/*.json")):
    r = json.loads(f.read_text())
    print(f"fidelity {r['id']}: e1 {r['e1_median_ms']:.1f} ms, generate {r['generate_median_ms']:.1f} ms, ratio "
          f"{r['ratio_e1_over_generate']:.3f}, tokens equal {r['tokens_equal']}, experts {r['experts_used']}")
