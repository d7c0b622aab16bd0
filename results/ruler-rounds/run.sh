#!/bin/bash
# Issue 48 item 4: correct-and-re-guess on RULER, the embedded pair in bfloat16 (dtype auto), query-aware.
# SpecKV@256, Ada-SpecKV@256 and SpecKV-PC@256/1024 with 0 (one check), 2 and 4 rounds, against dense:
# 4,096 tokens (55 samples: 11 tasks x 5) and 8,192 (33 samples: 11 x 3). Resumable: a rerun skips the rows
# each folder holds. Then `draftkv eval report` per folder (the rows carry guess_rounds and full_cache_tokens).
set -euo pipefail
cd "$(dirname "$0")/../.."
METHODS=dense
for rounds in 0 2 4; do
  METHODS="$METHODS,speckv:verify_rounds=$rounds@256,ada-speckv:verify_rounds=$rounds@256"
  METHODS="$METHODS,speckv-pc:verify_rounds=$rounds@256/1024"
done
for spec in "4096 5" "8192 3"; do
  set -- $spec
  draftkv eval ruler --length "$1" --samples "$2" --methods "$METHODS" --out "results/ruler-rounds/ruler-$1"
  draftkv eval report "results/ruler-rounds/ruler-$1"
done
