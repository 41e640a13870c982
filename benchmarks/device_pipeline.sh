#!/usr/bin/env bash
# Run the pipeline on the GPU machine: install the carried wheelhouse, run snakemake in its own working
# directory with extra config files (merged over config.yaml) on GPUS GPUs (one job per GPU, e1.gpus),
# then pack results/inputs/logs/figures into $OUT/NAME.tgz. Several can run at once (separate NAMEs):
# their GPU jobs share the GPUs through the same claim locks.
# Usage (repo root, on the device, .whl carried):
#   bash benchmarks/device_pipeline.sh NAME GPUS "CONFIGFILE..." TARGET...
# PIPELINE_TIMEOUT (s, default 540) bounds snakemake; whatever finished is packed either way.
set -uo pipefail
OUT=${OUT:-/tmp/e1-out}
mkdir -p "$OUT"
name=$1 gpus=$2 configs=$3
shift 3
[ -d /tmp/site/snakemake ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1  # once per machine: runs started later reuse it
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
work=/tmp/e1-$name
mkdir -p "$work"
cf=(--configfile "$PWD/config.yaml")
for f in $configs; do cf+=("$PWD/$f"); done
start=$(date +%s)
# targets first: --configfile takes several values and would swallow targets placed after it
timeout -s INT "${PIPELINE_TIMEOUT:-540}" python3 -m snakemake "$@" --snakefile "$PWD/Snakefile" --directory "$work" \
  --cores $((2 * gpus)) --resources gpu="$gpus" --keep-going "${cf[@]}" > "$OUT/$name.log" 2>&1
rc=$?
echo "$name: snakemake rc=$rc in $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.log"
grep -h "e2e median" "$work"/logs/*/measure/*.log | sed "s/^/$name /"
tar czf "$OUT/$name.tgz" -C "$work" results inputs logs figures 2>/dev/null
exit $rc
