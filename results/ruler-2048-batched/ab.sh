#!/usr/bin/env bash
# Wall time of one RULER sample with all 15 settings, settings decoded as one batch against each on its
# own, interleaved on the same samples (a quiet machine; run from the repository root).
set -euo pipefail
METHODS=dense,snapkv,speckv,ada-speckv,specpc,specprefill,lingua,keep-ends,ada-snapkv,h2o,streamingllm,pyramidkv,laq,speckv-pc,keep-last
OUT=${OUT:-/tmp/ruler-ab}
rm -rf "$OUT"
for task in ${TASKS:-niah_single_1 niah_multikey_3}; do
  for mode in batch-settings no-batch-settings; do
    start=$SECONDS
    draftkv eval ruler --length 2048 --samples 1 --tasks "$task" --methods "$METHODS" --budgets 128 \
      --prompt-budgets 512 --"$mode" --out "$OUT/$mode" > /dev/null 2>&1
    echo "$task $mode $((SECONDS - start)) s"
  done
done
python - "$OUT" <<'PY'
import json, sys
from collections import defaultdict
from pathlib import Path
for mode in ("batch-settings", "no-batch-settings"):
    seconds = defaultdict(float)
    for line in (Path(sys.argv[1]) / mode / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        seconds[row["sample"]] += row["seconds"]
    print(mode, {sample: round(value) for sample, value in seconds.items()})
PY
