#!/usr/bin/env bash
# The H200 runs of issue 15 (the cross-model study), in device calls under the 10-minute limit, one working dir:
#   bash benchmarks/device_h200_models.sh eager "molmoe-1b,llava-1.5-7b"   # GPU tests of the adapters (first call
#                                                                            # only: GPU_TESTS=1), then these models
#   bash benchmarks/device_h200_models.sh cuda_graph "molmoe-1b,llava-1.5-7b,qwen2.5-vl-7b,qwen3-vl-30b-a3b"
# Each model at the three images of config.yaml, the short prompt, N=64 (1 prefill + 63 decode steps), random
# weights, bfloat16, sdpa, experts auto, learned routing, energy not measured (energy.repeats 0: time).
# Then rule cross_model and its figure over every model measured so far in this working directory.
# Repo root on the device, .whl carried. Results go to $OUT/<backend>-<n>.tgz; a summary is printed last.
set -uo pipefail
backend=$1; models=$2
. benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
  --format=csv,noheader | tee "$OUT/gpu-$backend.txt"
if [ -n "${GPU_TESTS:-}" ]; then
  timeout -s INT 150 python3 -m pytest -q -rs tests/test_vlm.py -k "gpu" > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -n 6 "$OUT/pytest.log"
fi
t0=$(date +%s.%N)
timeout -s INT "${GRID_TIMEOUT:-480}" python3 -m snakemake results/e1_cross_model.json figures/e1_cross_model.png \
  --snakefile "$PWD/Snakefile" --directory "$work" --cores 2 --configfile "$PWD/config.yaml" "$PWD/benchmarks/h200-models.yaml" \
  --config "models=[$models]" "select_prompts=[short]" "backend=$backend" \
  --keep-going > "$OUT/$backend.log" 2>&1
echo "$backend ($models): snakemake rc=$? in $(python3 -c "import time; print(round(time.time() - $t0, 1))") s" \
  | tee -a "$OUT/$backend.log"
tag=$backend-$(echo "$models" | tr ',' '\n' | wc -l)
tar czf "$OUT/$tag.tgz" -C "$work" results logs figures 2>/dev/null
python3 benchmarks/cross_model_summary.py "$work"/results/*_cuda_bfloat16/measure/*.json | tee "$OUT/$tag-summary.txt"
