"""Decode ms/token of the ragged layouts on CUDA (random weights): per-head vs padded, PyramidKV and Ada-SnapKV."""
import statistics
import sys

import torch

import draftkv
from draftkv.bench import bench_requests
from draftkv.models import load_pair

pair = load_pair("/tmp/rand/target", "/tmp/rand/draft", device="cuda", dtype=torch.bfloat16)
for length in (8192, 32768):
    request = bench_requests(pair.tokenizer, length, 1, 32)[0]
    draftkv.generate_batch(pair, [request], "dense")  # warm-up
    for method in ("dense", "pyramidkv", "ada-snapkv"):
        for layout in ((None,) if method == "dense" else ("per-head", "padded")):
            params = {} if layout is None else {"budget": 256, "layout": layout}
            runs = []
            for _ in range(3):
                stats = draftkv.generate_batch(pair, [request], method, **params)[0].stats
                runs.append(1000 * stats.timings["decode"] / (stats.new_tokens - 1))
            print(length, method, layout, f"decode ms/token median {statistics.median(runs):.1f}",
                  [round(r, 1) for r in runs], "kv_bytes_stored", stats.kv_bytes_stored, flush=True)
sys.exit(0)
