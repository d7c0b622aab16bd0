#!/usr/bin/env bash
# Issue 35's CPU benchmark: the seven configurations at 2k, 4k and 8k tokens, 128 new tokens, one repeat
# each after a warm-up (run alone: nothing else on the machine). Three commands append to one folder; a
# configuration already in runs.jsonl is skipped, so the script resumes where it stopped.
set -euo pipefail
out=results/bench-cpu-speculation
common=(--lengths 2048,4096,8192 --new-tokens 128 --repeats 1 --no-memory --out "$out")
# dense and SpecKV with the checked guess, each without and with 4 proposals per target call
draftkv bench --methods dense,speckv --speculate 0,4 "${common[@]}"
# the paper's SpecKV (no checked guess), without speculation
draftkv bench --methods speckv:verify_lookahead=false --speculate 0 "${common[@]}"
# SpecPC and SpecKV-PC (checked guess) with 4 proposals
draftkv bench --methods specpc,speckv-pc --speculate 4 "${common[@]}"

# A second repeat at 2k and 8k (the first repeat's 8k dense prefill was 26% slower than the same prefill
# beside it), and speculate=auto at 2k (on this CPU it measures no gain and decodes without proposals).
common2=(--lengths 2048,8192 --new-tokens 128 --repeats 2 --no-memory --out "$out")
draftkv bench --methods dense,speckv --speculate 0,4 "${common2[@]}"
draftkv bench --methods speckv:verify_lookahead=false --speculate 0 "${common2[@]}"
draftkv bench --methods specpc,speckv-pc --speculate 4 "${common2[@]}"
for length in 2048 8192; do
  draftkv bench --methods dense,speckv --speculate auto --lengths $length --new-tokens 128 --repeats 1 --no-memory --out "$out"
done
# SpecPC and SpecKV-PC without speculation, beside the runs with it
draftkv bench --methods specpc,speckv-pc --speculate 0 "${common2[@]}"
