#!/usr/bin/env bash
# Issue 35: `speculate=auto` after its fix (it counts the draft's reading of the prompt, judges by the
# decode's own calls, and the (k+1)-token calls stack query heads instead of copying the cache), beside
# plain decoding and 4 fixed proposals, at 2k and 8k tokens, 128 new tokens. Run alone on the machine.
# A configuration already in runs.jsonl is skipped, so the script resumes where it stopped.
set -euo pipefail
out=results/bench-cpu-auto
for repeats in 1 2; do
  common=(--lengths 2048,8192 --new-tokens 128 --repeats $repeats --no-memory --out "$out")
  draftkv bench --methods dense,speckv --speculate 0,auto,4 "${common[@]}"
  draftkv bench --methods specpc,speckv-pc --speculate 0,auto "${common[@]}"
done
# What auto times on this machine, over caches of 128 and 2k tokens (wide_calls.py times 8k)
python benchmarks/speculation_costs.py --lengths 128,2048 --out "$out/costs.json"
python results/bench-cpu-auto/wide_calls.py > "$out/wide_calls.json"
# The paper's SpecKV (no checked guess, no speculation) on the same day, for SpecKV's overhead over dense
draftkv bench --methods speckv:verify_lookahead=false --speculate 0 --lengths 2048,8192 --new-tokens 128 --repeats 2 --no-memory --out "$out"
