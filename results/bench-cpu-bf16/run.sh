#!/usr/bin/env bash
# The CPU at its full speed (issue 46): the embedded pair in dtype auto (bfloat16 on this machine) from
# 2k to 32k tokens, 128 new tokens, and at 8k in float32 beside it. Resumable: each command skips the
# rows runs.jsonl already holds. Run alone on the machine (no eval, no tests beside it).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/bench-cpu-bf16
common=(--methods dense,snapkv,speckv,specpc,speckv-pc --budget 256 --prompt-budget 1024 --new-tokens 128)
# Every configuration is timed once, in its memory probe's fresh process (--repeats 0; the table marks
# these "1 (probe)"): one run at 32k takes up to half an hour here, and the whole sweep fits one session.
# 32,640 tokens: the prompt and 128 new tokens fill the target's 32,768 positions.
draftkv bench --lengths 16384,32640 --repeats 0 "${common[@]}" --out "$out"
draftkv bench --lengths 2048,4096,8192 --repeats 0 "${common[@]}" --out "$out"
# 8k and 2k in float32, beside the bfloat16 rows (probe against probe).
draftkv bench --lengths 8192 --repeats 0 --dtype float32 "${common[@]}" --out "$out"
draftkv bench --lengths 2048 --repeats 0 --dtype float32 "${common[@]}" --out "$out"
