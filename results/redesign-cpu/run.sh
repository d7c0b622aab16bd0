#!/usr/bin/env bash
# Speed before and after the redesign of issue 34 (one typed plan, scorers, engine/ layout, cache layers
# that own their behaviour, the decode spec), on this CPU, nothing else running.
# 1. The eval runner's wall time for one RULER-2k sample with all 15 settings of results/ruler-2048:
#    before (commit 0105245, the last before issue 34, checked out in a worktree at $OLD) and after.
# 2. draftkv bench at 2k with the five main methods, 3 repeats, against results/executor-cpu/bench.
# Run from the repository root: bash results/redesign-cpu/run.sh
set -euo pipefail
OLD=${OLD:-/tmp/old34}
OUT=results/redesign-cpu
METHODS=dense,snapkv,speckv,ada-speckv,specpc,specprefill,lingua,keep-ends,ada-snapkv,h2o,streamingllm,pyramidkv,laq,speckv-pc,keep-last
RULER="eval ruler --length 2048 --samples 1 --tasks niah_single_1 --methods $METHODS --budgets 128 --prompt-budgets 512 --seed 0"
for which in before after; do
  src=$([ "$which" = before ] && echo "$OLD/src" || echo src)
  rm -rf "/tmp/runner-$which"
  start=$(date +%s.%N)
  PYTHONPATH=$src python -m draftkv $RULER --out "/tmp/runner-$which" 2> "$OUT/runner-$which.log"
  end=$(date +%s.%N)
  echo "$which: $(echo "$end - $start" | bc) s with model loading" | tee -a "$OUT/runner.txt"
  cp "/tmp/runner-$which/results.jsonl" "$OUT/runner-$which.jsonl"
done
draftkv bench --lengths 2048 --methods dense,snapkv,speckv,specpc,speckv-pc --budget 256 --prompt-budget 1024 \
  --new-tokens 32 --repeats 3 --out "$OUT/bench" 2> "$OUT/bench.log"
