#!/usr/bin/env bash
# The H200 runs of issues 13 and 14, in three device calls (each under the 10-minute limit), one working directory:
#   bash benchmarks/device_h200_routing_energy.sh checks   # GPU tests, NVML counter sanity check, the released-
#                                                          # layout loader at full size (write + load, float32)
#   bash benchmarks/device_h200_routing_energy.sh routing  # the NVML counter sanity check, then
#                                                          # 3 images x short prompt x N=64 x moe_routing
#                                                          # [learned, balanced], backend eager, with the energy
#                                                          # phase and GPU state; stage table, energy, figures
#   bash benchmarks/device_h200_routing_energy.sh routing_graphs  # the same with backend cuda_graph
# ROUTING=balanced runs one routing mode only; GPU_TESTS="tests/..." runs those tests first.
# Repo root on the device, .whl carried. Results go to $OUT/<mode>.tgz as they finish; a summary is printed last.
set -uo pipefail
mode=$1
. benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
  --format=csv,noheader | tee "$OUT/$mode-gpu.txt"
case "$mode" in
checks)
  timeout -s INT 200 python3 -m pytest -q -rs tests/test_graphs.py tests/test_routing.py tests/test_checkpoint.py \
    tests/test_energy.py > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -n 5 "$OUT/pytest.log"
  timeout 60 python3 benchmarks/energy_sanity.py --seconds 5 > "$OUT/energy_sanity.json" 2> "$OUT/energy_sanity.err"
  echo "energy sanity rc=$?"; cat "$OUT/energy_sanity.json"; tail -3 "$OUT/energy_sanity.err"
  ckpt=/tmp/molmoe-released
  timeout 200 python3 benchmarks/released_loader_check.py write "$ckpt" > "$OUT/loader_write.json" 2> "$OUT/loader_write.err"
  echo "write rc=$?"; ls -la "$ckpt" | tee "$OUT/loader_files.txt"
  timeout 200 python3 benchmarks/released_loader_check.py load "$ckpt" > "$OUT/loader_load.json" 2> "$OUT/loader_load.err"
  echo "load rc=$?"; cat "$OUT/loader_load.json"; tail -3 "$OUT/loader_load.err"
  rm -rf "$ckpt"
  tar czf "$OUT/checks.tgz" -C "$OUT" pytest.log energy_sanity.json energy_sanity.err loader_write.json \
    loader_write.err loader_files.txt loader_load.json loader_load.err checks-gpu.txt
  ;;
routing|routing_graphs)
  backend=eager; [ "$mode" = routing_graphs ] && { backend=cuda_graph; work=/tmp/e1-h200-graphs; mkdir -p "$work"; }
  [ -n "${GPU_TESTS:-}" ] && { timeout -s INT 120 python3 -m pytest -q -rs $GPU_TESTS > "$OUT/pytest.log" 2>&1
    echo "pytest rc=$?"; tail -n 4 "$OUT/pytest.log"; }
  timeout 60 python3 benchmarks/energy_sanity.py --seconds 5 > "$OUT/energy_sanity.json" 2> "$OUT/energy_sanity.err"
  echo "energy sanity rc=$?"; cat "$OUT/energy_sanity.json"; tail -3 "$OUT/energy_sanity.err"
  t0=$(date +%s.%N)
  timeout -s INT "${GRID_TIMEOUT:-520}" python3 -m snakemake results/e1_stage_latency_breakdown.json \
    results/e1_stage_energy.json figures/e1_expert_load.png figures/e1_stage_energy_plot.png \
    --snakefile "$PWD/Snakefile" --directory "$work" --cores 2 \
    --configfile "$PWD/config.yaml" "$PWD/benchmarks/h200-routing-energy.yaml" \
    --config "decode_tokens=[64]" "select_prompts=[short]" "moe_routing=[${ROUTING:-learned,balanced}]" "backend=$backend" \
    > "$OUT/$mode.log" 2>&1
  echo "$mode: snakemake rc=$? in $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" | tee -a "$OUT/$mode.log"
  tar czf "$OUT/$mode.tgz" -C "$work" results logs figures 2>/dev/null
  python3 benchmarks/h200_summary.py "$work/results/$run" | tee "$OUT/$mode-summary.txt"
  ;;
*) echo "mode: checks | routing | routing_graphs"; exit 2;;
esac
