#!/usr/bin/env bash
# First GPU check of issue 7: the decode-backend tests on the GPU, the graph probe, and a few knob
# variants of one configuration through the workflow. Results packed into $OUT.
# Usage (repo root, on the device, .whl carried): bash benchmarks/device_knobs_probe.sh
set -uo pipefail
OUT=${OUT:-/tmp/e1-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
timeout -s INT 120 python3 -m pytest -q -rs tests/test_graph_decode.py 2>&1 | tail -5 | tee "$OUT/pytest.log"
timeout -s INT 150 python3 benchmarks/graph_probe.py --out "$OUT/graph_probe.json" 2>&1 | tee "$OUT/graph_probe.log"
run=molmoe-1b_cuda_bfloat16
targets=()
for v in "$@"; do targets+=("results/$run/measure/$v.json"); done
start=$(date +%s)
timeout -s INT "${KNOBS_TIMEOUT:-240}" python3 -m snakemake "${targets[@]}" --cores 1 --keep-going \
  --configfile benchmarks/h200-knobs.yaml > "$OUT/knobs_snakemake.log" 2>&1
echo "knob jobs: rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/knobs_snakemake.log"
grep -h "e2e median\|captured" logs/$run/measure/*.log
python3 - <<'PY'
import glob, json
for f in sorted(glob.glob("results/molmoe-1b_cuda_bfloat16/measure/*.json")):
    s = json.load(open(f))
    print(s["id"], "decode/step median %.3f ms" % s["decode_step"]["median_ms"], "prefill %.2f" % s["stages"]["prefill"]["median_ms"],
          "capture", s.get("graph_capture_s"), "tokens_vs_eager", s.get("tokens_vs_eager_decode"))
PY
tar czf "$OUT/knobs.tgz" results logs 2>/dev/null
