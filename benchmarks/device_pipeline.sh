#!/usr/bin/env bash
# Run the pipeline on the GPU machine: install the carried wheelhouse, run snakemake with the given
# extra config files (merged over config.yaml), pack results/inputs/logs/figures into $OUT.
# Usage (repo root, on the device): bash benchmarks/device_pipeline.sh [TARGET] [CONFIGFILE...]
set -uo pipefail
OUT=${OUT:-/tmp/e1-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
target=${1:-figures/e1_stage_stack_plot.png}
shift || true
cf=()
for f in "$@"; do cf+=(--configfile "$f"); done
start=$(date +%s)
python3 -m snakemake "$target" --cores 1 --keep-going "${cf[@]}" > "$OUT/snakemake.log" 2>&1
rc=$?
echo "snakemake rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/snakemake.log"
tail -5 "$OUT/snakemake.log"
grep -h "e2e median" logs/*/measure/*.log
tar czf "$OUT/pipeline.tgz" results inputs logs figures 2>/dev/null
exit $rc
