#!/usr/bin/env bash
# Issue 18's runs, in order, each resumable (run it again after any interruption: finished rows are
# kept and skipped). About 6-8 hours of this 2-core CPU; never beside a timed benchmark.
set -euo pipefail
cd "$(dirname "$0")/../.."
KV_METHODS=dense,snapkv,speckv,ada-speckv,ada-snapkv,laq,h2o,pyramidkv,streamingllm
PROMPT_METHODS=specpc,specprefill,lingua,keep-ends

# RULER at 4,096 tokens: 11 tasks x 5 samples; KV methods at 128 and 256, prompt methods at 512 and 1024,
# SpecKV-PC at (256, 1024) only (named with its budgets, so it joins the same shared batch).
draftkv eval ruler --length 4096 --samples 5 --methods "$KV_METHODS,$PROMPT_METHODS,speckv-pc@256/1024" \
  --budgets 128,256 --prompt-budgets 512,1024 --out results/ruler-4096
# RULER at 8,192 tokens: 11 tasks x 3 samples, KV 256 and prompt 1024.
draftkv eval ruler --length 8192 --samples 3 --methods dense,snapkv,speckv,ada-speckv,laq,specpc,specprefill,speckv-pc \
  --budgets 256 --prompt-budgets 1024 --out results/ruler-8192
# Query-agnostic at 4,096: the context compressed before the question is known.
draftkv eval ruler --length 4096 --samples 2 --methods dense,snapkv,speckv,ada-speckv --budgets 256 --query-agnostic \
  --out results/ruler-4096-agnostic
# The agreement analysis at 4,096 and 8,192: 10 samples each (2 of each of five tasks).
AGREEMENT_TASKS=niah_single_2,niah_multikey_1,niah_multivalue,vt,fwe
draftkv analyze agreement --length 4096 --samples 2 --tasks "$AGREEMENT_TASKS"
draftkv analyze agreement --length 8192 --samples 2 --tasks "$AGREEMENT_TASKS"
# ... and at 2,048 on the same ten (the folder's four samples from issue 5 are among them and are kept).
draftkv analyze agreement --length 2048 --samples 2 --tasks "$AGREEMENT_TASKS"
# RULER at 2,048 at the 8k budgets too (KV 256, prompt 1024), so one absolute budget spans all three lengths
# (the folder already holds KV 128 and prompt 512).
draftkv eval ruler --length 2048 --samples 5 --methods dense,snapkv,speckv,ada-speckv,laq,specpc,specprefill,speckv-pc \
  --budgets 256 --prompt-budgets 1024 --out results/ruler-2048
# The cross-length report, with the agreement against length.
draftkv eval report results/ruler-2048 results/ruler-4096 results/ruler-8192 --out results/ruler-by-length \
  --agreement results/agreement-2048 --agreement results/agreement-4096 --agreement results/agreement-8192
