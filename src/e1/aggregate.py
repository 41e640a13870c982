"""Gather per-configuration summaries into the study's e1_stage_latency_breakdown.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Run facts that must agree across configurations: results from different setups never mix silently.
# The sweep knobs (attention/experts implementation, decode backend, top-k, max_crops) differ by design:
# each configuration row carries its own "variant" and "knobs".
SHARED = ("model", "weights", "seed", "device", "dtype", "torch", "transformers", "protocol")


def aggregate(summaries: list[str | Path], out: str | Path) -> dict[str, Any]:
    configs = [json.loads(Path(p).read_text()) for p in summaries]
    if not configs:
        raise ValueError("no per-configuration summaries to aggregate")
    first = configs[0]["meta"]
    for c in configs[1:]:
        diff = {k: (first.get(k), c["meta"].get(k)) for k in SHARED if c["meta"].get(k) != first.get(k)}
        if diff:
            raise ValueError(f"configuration {c['id']} was measured under a different setup than "
                             f"{configs[0]['id']}: {diff}; refusing to mix them in one table")
    meta = {k: first[k] for k in (*SHARED, "device_type", "convention")}
    meta["env"] = first["env"]
    meta["build_s"] = [c["meta"]["build_s"] for c in configs]
    meta["tokens_identical_across_runs"] = all(c["tokens_identical_across_runs"] for c in configs)
    result = {"meta": meta, "configs": [{k: v for k, v in c.items() if k != "meta"} for c in configs]}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    return result
