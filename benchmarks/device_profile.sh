#!/usr/bin/env bash
# One device call for the profiler rules: profile + parse_trace for the configurations named on the
# command line (IMAGE__PROMPT__nN__VARIANT, e.g. 336x336__short__n64__sdpa.grouped_mm.eager.k8.c12), then the fidelity benchmark; results packed into $OUT as they finish.
# Usage (repo root, on the device, .whl carried): bash benchmarks/device_profile.sh CONFIG_ID...
set -uo pipefail
OUT=${OUT:-/tmp/e1-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
run=${E1_RUN:-molmoe-1b_cuda_bfloat16}  # results/<model>_<device>_<dtype> of the device run
targets=()
for id in "$@"; do targets+=("results/$run/breakdown/$id.json"); done
start=$(date +%s)
timeout -s INT "${PROFILE_TIMEOUT:-300}" python3 -m snakemake --cores 1 --keep-going "${targets[@]}" > "$OUT/profile_snakemake.log" 2>&1
echo "profile rules: rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/profile_snakemake.log"
ls -la results/$run/profile/ | tee -a "$OUT/profile_snakemake.log"
first=$(ls results/$run/profile/*.trace.json.gz 2>/dev/null | head -n 1)
[ -n "$first" ] && cp "$first" "$OUT/"
tar czf "$OUT/profile_results.tgz" --exclude='*.trace.json.gz' results logs 2>/dev/null
timeout -s INT "${FIDELITY_TIMEOUT:-170}" python3 benchmarks/fidelity.py --out "$OUT/fidelity.json" > "$OUT/fidelity.log" 2>&1
echo "fidelity rc=$?"; tail -n 30 "$OUT/fidelity.log"
