#!/usr/bin/env bash
# One device call: fidelity benchmark + a one-configuration pipeline run on the GPU.
# Run from the repo root on the GPU machine with the wheelhouse carried in .whl (see README).
set -uo pipefail
OUT=${OUT:-/tmp/e1-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,power.limit,temperature.gpu --format=csv
python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
python3 benchmarks/fidelity.py --out "$OUT/fidelity.json" 2>&1 | tee "$OUT/fidelity.log"
cat > /tmp/smoke.yaml <<'YAML'
images: ["1008x784"]
prompts: {short: {tokens: 16}}
decode_tokens: [16]
YAML
/usr/bin/time -v python3 -m snakemake --cores 1 --configfile config.yaml /tmp/smoke.yaml figures/e1_stage_stack_plot.png 2>&1 | tail -40 | tee "$OUT/smoke.log"
cat logs/*/measure/*.log >> "$OUT/smoke.log"
tar czf "$OUT/smoke_results.tgz" results figures logs
