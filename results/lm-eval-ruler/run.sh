#!/usr/bin/env bash
# The measured lm-eval example (issue 20): RULER samples at 2,048 tokens, written as an lm-eval task, scored
# through `draftkv lm-eval` on the embedded pair with dense, SnapKV and SpecKV at a KV budget of 128.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=results/lm-eval-ruler
draftkv eval ruler --length 2048 --samples 1 --dump "$OUT/samples.jsonl" \
  --tasks niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multikey_2,niah_multikey_3,niah_multivalue,niah_multiquery,vt,cwe,fwe
for setting in method=dense method=snapkv,budget=128 method=speckv,budget=128; do
  name=$(echo "$setting" | sed 's/method=//; s/,budget=/-/')
  [ -d "$OUT/$name" ] && continue   # done in an earlier run
  /usr/bin/time -f "$name: %e s" -a -o "$OUT/wall.txt" \
    draftkv lm-eval --model draftkv --model_args "$setting" --tasks draftkv_ruler --include_path benchmarks/lm_eval_ruler \
    --apply_chat_template --batch_size 4 --device cpu --output_path "$OUT/$name.tmp" --log_samples
  mv "$OUT/$name.tmp" "$OUT/$name"
done
