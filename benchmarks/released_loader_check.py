"""The released-layout loader at full size on the GPU: write MolmoE-1B's seeded random weights in the released
layout (float32 shards of at most 5 GiB, like a download), load them in a fresh process into bfloat16 on the
GPU, and report the host memory the load took beside the largest shard, and whether every tensor arrived.

  python3 benchmarks/released_loader_check.py write DIR     # build on the GPU, save_released(float32)
  python3 benchmarks/released_loader_check.py load DIR      # fresh process: load, compare, print JSON
"""

from __future__ import annotations

import json
import resource
import sys
import time

import torch

from e1.model.build import build_model
from e1.model.checkpoint import save_released


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    if mode == "write":
        t0 = time.perf_counter()
        model = build_model("molmoe-1b", device="cuda", dtype="bfloat16", seed=3)
        save_released(model, directory, dtype=torch.float32)
        print(json.dumps({"written_s": time.perf_counter() - t0}))
        return
    t0 = time.perf_counter()
    loaded = build_model("molmoe-1b", device="cuda", dtype="bfloat16", weights=directory)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    report = dict(loaded.weights_report)
    ref = build_model("molmoe-1b", device="cuda", dtype="bfloat16", seed=3)
    a, b = loaded.state_dict(), ref.state_dict()
    report.update(load_s=load_s, process_peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                  parameters_in_model=sum(p.numel() for p in loaded.parameters()),
                  bit_identical_to_the_saved_model=all(torch.equal(a[k], b[k]) for k in b) and a.keys() == b.keys())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
