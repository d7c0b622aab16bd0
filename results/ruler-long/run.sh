#!/bin/bash
# Issue 47 item 5: RULER at 16,384 tokens (22 samples: 11 download-free tasks x 2) and 32,768 (11 samples,
# one per task), query-aware, on the bfloat16 path (dtype auto), the embedded pair. Every setting at 1,024
# KV entries per head and at compression ratio 0.9 (a tenth kept). Each command resumes: rows its folder
# holds are skipped, so run this again after a stop. SPECKV names SpecKV with its better allocation at 4k
# (results/ruler-4096-curve), e.g. SPECKV=speckv:allocation=global.
set -euo pipefail
cd "$(dirname "$0")/../.."
SPECKV=${SPECKV:-speckv}
METHODS="dense,snapkv,kvzip,$SPECKV,specpc,speckv-pc@1024/2048,speckv-pc@0.5/0.2"
for spec in "16384 2" "32768 1"; do
  set -- $spec
  draftkv eval ruler --length "$1" --samples "$2" --methods "$METHODS" --budgets 1024,0.1 \
    --prompt-budgets 1024,0.1 --out "results/ruler-long/ruler-$1"
  draftkv eval report "results/ruler-long/ruler-$1"
done
