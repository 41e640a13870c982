"""Valid artifacts built by hand, for tests that check how readers treat good and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

from e1.latency.stats import summarize
from e1.latency.timing import CONVENTION
from e1.model.routing import load_stats
from e1.names import STAGES

KNOBS = {"attn_implementation": "sdpa", "experts_implementation": "auto", "backend": "eager",
         "moe_top_k": 2, "max_crops": 12, "moe_routing": "learned"}
VARIANT = "sdpa.auto.eager.k2.c12.learned"


def measure_summary(cid: str = "a", stage_ms: dict[str, float] | None = None, decode_ms: float | None = 1.0,
                    **meta) -> dict:
    """A measure job's summary as e1.latency.measure writes it (tiny model on the CPU)."""
    ms = {s: 1.0 for s in STAGES} | (stage_ms or {})
    stages = {s: summarize([v, v]) for s, v in ms.items()}
    stages.update(preprocess=summarize([0.5, 0.5]), e2e=summarize([sum(ms.values())] * 2),
                  unattributed=summarize([0.0, 0.0]))
    m = {"model": "molmoe-1b-tiny", "weights": "random", "token_ids": "synthetic ids", "seed": 0,
         "device": "CPU (x86_64, 2 threads)",
         "device_type": "cpu", "dtype": "float32", "torch": "2.x", "transformers": "5.x", "convention": CONVENTION,
         "protocol": {"warmup": 3, "timed": 10, "batch_size": 1}, "build_s": 0.1, "env": {"host": "test"}}
    m.update(meta)
    return {"id": cid, "variant": VARIANT, "knobs": dict(KNOBS), "image": "336x336", "prompt": "short",
            "prompt_tokens": 16, "text_tokens": 20, "decode_tokens": 1 if decode_ms is None else 2,
            "decode_steps": 0 if decode_ms is None else 1,
            "counts": {"tiling": [1, 1], "vit_crops": 2, "vit_tokens": 1154, "pooled_features": 288,
                       "inserted_features": 288, "image_tokens": 316, "prefill_tokens": 337},
            "stages": stages, "decode_step": None if decode_ms is None else summarize([decode_ms, decode_ms]),
            "tokens_identical_across_runs": True, "graph_capture_s": None, "graph_vs_eager": None,
            "routing": {"mode": "learned", "prefill": load_stats([[337, 337, 0, 0, 0, 0, 0, 0]] * 2, 2),
                        "decode": None if decode_ms is None else load_stats([[1, 1, 0, 0, 0, 0, 0, 0]] * 2, 2)},
            "meta": m}


def write(path: Path, obj: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path
