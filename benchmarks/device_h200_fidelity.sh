#!/usr/bin/env bash
# Issue 15 on the H200: rule fidelity for each transformers VLM as the study's model: e1's four stages against the
# model class's own generate() on the processor's outputs (whole request), 560x560, short prompt, N=64, 3 pairs.
#   bash benchmarks/device_h200_fidelity.sh "llava-1.5-7b qwen2.5-vl-7b qwen3-vl-30b-a3b"
# Repo root on the device, .whl carried. Results go to $OUT/fidelity.tgz; a summary is printed last.
set -uo pipefail
. benchmarks/device_env.sh
for m in $1; do
  timeout -s INT 170 python3 -m snakemake "results/${m}_cuda_bfloat16/fidelity/560x560__short__n64__sdpa.auto.eager.k$(
    [ "$m" = qwen3-vl-30b-a3b ] && echo 8 || echo 0).c1.learned.json" \
    --snakefile "$PWD/Snakefile" --directory "$work" --cores 2 --configfile "$PWD/config.yaml" \
    --config "model=$m" "images=[560x560]" "select_prompts=[short]" "fidelity={decode_tokens: 64, pairs: 3}" \
    > "$OUT/fidelity-$m.log" 2>&1
  echo "$m: rc=$?"
done
tar czf "$OUT/fidelity.tgz" -C "$work" results logs 2>/dev/null
python3 - "$work" <<'PY'
import glob, json, sys
for p in sorted(glob.glob(f"{sys.argv[1]}/results/*/fidelity/*.json")):
    r = json.load(open(p))
    print(r["meta"]["model"], r["image"], f"e1 {r['e1_median_ms']:.1f} ms, generate() {r['generate_median_ms']:.1f} ms, "
          f"ratio {r['ratio_e1_over_generate']:.3f}, pairs {[round(x, 3) for x in r['pair_ratios']]}, "
          f"tokens equal {r['tokens_equal']}, experts {r['experts_used']}")
PY
