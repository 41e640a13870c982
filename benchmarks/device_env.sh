# Sourced by the device scripts (benchmarks/device_h200*.sh): the output folder, the wheelhouse installed into
# /tmp/site (once per machine), this checkout's src/ first on PYTHONPATH, the working directory and run name.
OUT=${OUT:-/tmp/e1-out}
mkdir -p "$OUT"
[ -d /tmp/site/snakemake ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1
work=/tmp/e1-h200
mkdir -p "$work"
run=molmoe-1b_cuda_bfloat16
