#!/usr/bin/env bash
# Two GPU jobs at once on a 2-GPU node (issue 6): the same two full-model measure jobs run
#   concurrent: snakemake --cores 2 --resources gpu=2   (each job claims its own GPU, e1.gpus)
#   alone:      snakemake --cores 2 --resources gpu=1   (one at a time)
# in separate working directories, then benchmarks/multigpu_compare.py prints per job the claimed GPU
# (index, UUID, bus id), the wall-clock start/end and the overlap, and the median stage latencies
# concurrent vs alone. An nvidia-smi sampler logs which process sits on which GPU during the concurrent run.
# Usage (repo root, on the device, .whl carried): bash benchmarks/device_multigpu.sh
# MULTIGPU_IDS picks other configurations; MULTIGPU_SNAKEMAKE_ARGS adds snakemake arguments to both runs,
# MULTIGPU_CONCURRENT_ARGS to the concurrent one (the CPU rehearsal: --config device=cpu for both,
# --set-threads measure=1 for the concurrent run, E1_GPU_CLAIM_ON_CPU=1, a fake nvidia-smi).
set -uo pipefail
OUT=${OUT:-/tmp/e1-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
IDS=${MULTIGPU_IDS:-"336x336__short__n64__sdpa.grouped_mm.eager.k8.c12.learned 336x336__medium__n64__sdpa.grouped_mm.eager.k8.c12.learned"}  # similar lengths: their runs overlap fully
WORK=${MULTIGPU_WORK:-/tmp/e1-multigpu}
rm -rf "$WORK" && mkdir -p "$WORK/concurrent" "$WORK/alone"
nvidia-smi --query-gpu=index,uuid,pci.bus_id,name --format=csv | tee "$OUT/gpus.csv"

run() {  # run MODE GPUS [ARGS]: the measure jobs of $IDS in $WORK/MODE with --resources gpu=GPUS
  local mode=$1 k=$2 extra=${3:-} run_dir image prompt targets=() inputs=()
  run_dir=${E1_RUN:-molmoe-1b_cuda_bfloat16}
  for id in $IDS; do
    targets+=("results/$run_dir/measure/$id.json")
    IFS=_ read -r image prompt _ <<< "${id//__/_}"  # IMAGE__PROMPT__nN__VARIANT: the first two parts
    inputs+=("inputs/images/$image.png" "inputs/prompts/$prompt.json")
  done
  # inputs first, so that the measure jobs become ready at the same moment
  timeout -s INT 120 python3 -m snakemake "${inputs[@]}" --snakefile "$PWD/Snakefile" --directory "$WORK/$mode" \
    --cores 2 --configfile "$PWD/config.yaml" ${MULTIGPU_SNAKEMAKE_ARGS:-} > "$OUT/inputs_$mode.log" 2>&1 \
    || echo "$mode: input jobs failed (see inputs_$mode.log)"
  local start=$(date +%s)
  timeout -s INT "${MULTIGPU_TIMEOUT:-150}" python3 -m snakemake "${targets[@]}" --snakefile "$PWD/Snakefile" \
    --directory "$WORK/$mode" --cores 2 --resources gpu="$k" --keep-going --configfile "$PWD/config.yaml" \
    ${MULTIGPU_SNAKEMAKE_ARGS:-} $extra > "$OUT/snakemake_$mode.log" 2>&1
  echo "$mode (gpu=$k): snakemake rc=$? in $(( $(date +%s) - start )) s" | tee -a "$OUT/snakemake_$mode.log"
  grep -h "gpu claim\|e2e median" "$WORK/$mode"/logs/*/measure/*.log
}

( while :; do echo "t $(date +%s.%N)"; nvidia-smi --query-compute-apps=pid,gpu_bus_id --format=csv,noheader; sleep 1; done ) \
  > "$OUT/apps_concurrent.log" 2>&1 &
sampler=$!
run concurrent 2 "${MULTIGPU_CONCURRENT_ARGS:-}"
kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
run alone 1

timeout -s INT 60 python3 benchmarks/multigpu_compare.py "$WORK/concurrent" "$WORK/alone" \
  --apps "$OUT/apps_concurrent.log" --out "$OUT/multigpu_compare.json" 2>&1 | tee "$OUT/multigpu_compare.txt"
rc=${PIPESTATUS[0]}
tar czf "$OUT/multigpu.tgz" -C "$WORK" concurrent/results concurrent/logs alone/results alone/logs 2>/dev/null
exit "$rc"
