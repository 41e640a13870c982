"""Print the cross-model measurements of a device run: per model, image and backend, the stage medians, the
median decode step, the job's length, and graph-vs-eager agreement (measure summaries as arguments)."""

from __future__ import annotations

import json
import sys


def main(paths: list[str]) -> None:
    print(f"{'model':18} {'image':9} {'backend':10} {'vision':>8} {'proj':>7} {'prefill':>8} {'decode':>8} "
          f"{'step':>6} {'e2e':>8} {'T':>5} {'job s':>6}  graph=eager")
    rows = []
    for p in paths:
        s = json.load(open(p))
        st, m = s["stages"], s["meta"]
        cmp = s.get("graph_vs_eager") or {}
        rows.append((m["model"], s["image"], s["knobs"]["backend"], *(st[k]["median_ms"] for k in
                     ("vision_encoder", "projector", "prefill", "decode")), (s["decode_step"] or {}).get("median_ms"),
                     st["e2e"]["median_ms"], s["counts"]["prefill_tokens"], m["job_time"]["total_s"],
                     cmp.get("logits_within_tolerance")))
    for r in sorted(rows):
        print(f"{r[0]:18} {r[1]:9} {r[2]:10} {r[3]:8.2f} {r[4]:7.2f} {r[5]:8.2f} {r[6]:8.1f} {r[7]:6.2f} {r[8]:8.1f} "
              f"{r[9]:5d} {r[10]:6.1f}  {r[11]}")


if __name__ == "__main__":
    main(sys.argv[1:])
