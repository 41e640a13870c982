#!/usr/bin/env bash
# The H200 runs of issue 12, in two device calls (each under the 10-minute limit), in one working directory:
#   bash benchmarks/device_h200.sh graphs   # GPU tests, the 27 configurations with backend cuda_graph,
#                                           # the generate() check (eager, 3 images)
#   bash benchmarks/device_h200.sh eager    # eager 16/64 new tokens (18 configurations), 6 profiles (short
#                                           # prompt, N = 64, both backends), calibrate, flop checks
# Repo root on the device, .whl carried. Results (no traces) go to $OUT/<mode>.tgz as they finish; a summary
# of each job's stage medians and start-up cost is printed last.
set -uo pipefail
mode=$1
. benchmarks/device_env.sh
sm() {  # sm LOG TIMEOUT ARGS...: snakemake in the working directory with config.yaml
  local log=$1 t=$2; shift 2
  local t0=$(date +%s.%N)
  # no --keep-going: a failing job stops the run early instead of every job failing the same way
  timeout -s INT "$t" python3 -m snakemake "$@" --snakefile "$PWD/Snakefile" --directory "$work" --cores 2 \
    --configfile "$PWD/config.yaml" > "$OUT/$log.log" 2>&1
  echo "$log: snakemake rc=$? in $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" | tee -a "$OUT/$log.log"
}
pack() { tar czf "$OUT/$mode.tgz" -C "$work" --exclude='*.trace.json.gz' results logs inputs 2>/dev/null; }
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit --format=csv,noheader | tee "$OUT/$mode-gpu.txt"
case "$mode" in
graphs)
  timeout -s INT 150 python3 -m pytest -q -rs tests/test_graphs.py tests/test_host_cost.py > "$OUT/pytest.log" 2>&1
  rc=$?; tail -n 15 "$OUT/pytest.log"
  [ "$rc" = 0 ] || { echo "GPU tests failed (rc=$rc): stopping before the grid"; exit 1; }
  sm graph_grid "${GRID_TIMEOUT:-390}" results/e1_stage_latency_breakdown.json --config backend=cuda_graph
  pack
  fid=(); for i in 336x336 560x560 1008x784; do fid+=("results/$run/fidelity/${i}__short__n64__sdpa.auto.eager.k8.c12.learned.json"); done
  sm fidelity 150 "${fid[@]}"
  pack
  ;;
eager)
  sm eager_grid "${GRID_TIMEOUT:-300}" results/e1_stage_latency_breakdown.json --config "decode_tokens=[${EAGER_N:-16,64}]"
  pack
  targets=()
  for i in 336x336 560x560 1008x784; do for b in eager cuda_graph; do
    targets+=("results/$run/breakdown/${i}__short__n64__sdpa.auto.$b.k8.c12.learned.json"); done
    targets+=("results/$run/flopcheck/${i}__short__sdpa.auto.eager.k8.c12.learned.json"); done
  sm profiles 230 "${targets[@]}" "results/$run/calibrate.json" --config "backend=[eager,cuda_graph]"
  pack
  ;;
*) echo "mode: graphs | eager"; exit 2;;
esac
python3 benchmarks/h200_summary.py "$work/results/$run" | tee "$OUT/$mode-summary.txt"
