"""Decode speed of two checkouts of draftkv, run in turn on the same machine (an A/B that the day's
noise cannot bias): decode ms per token of dense and SpecKV (budget 256) at 1k tokens, 24 new tokens,
two runs each per process.

Run from the repository root, with the older checkout in a worktree at /tmp/old:
    for i in 1 2; do for w in /tmp/old .; do .venv/bin/python results/executor-cpu/decode_ab.py $w; done; done
"""

import json
import sys

sys.path.insert(0, sys.argv[1] + "/src")

import draftkv  # noqa: E402
from draftkv import bench  # noqa: E402
from draftkv.methods import get_method  # noqa: E402
from draftkv.models import load_pair  # noqa: E402

pair = load_pair("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", device="cpu", dtype="float32")
requests = bench.bench_requests(pair.tokenizer, 1024, 1, 24)
decode_ms: dict[str, list[float]] = {}
for name, params in (("dense", {}), ("speckv", {"budget": 256})):
    for _ in range(2):
        stats = draftkv.generate_batch(pair, requests, get_method(name, **params))[0].stats
        decode_ms.setdefault(name, []).append(round(1000 * stats.timings["decode"] / (stats.new_tokens - 1), 1))
print(sys.argv[1], json.dumps(decode_ms), flush=True)
