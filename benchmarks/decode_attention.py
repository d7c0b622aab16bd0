"""One decode step's attention on this CPU: SDPA's grouped-query path (what transformers calls for one
query) against the query heads of each KV head stacked as that head's queries (`engine.attention.
stacked_sdpa`), for the embedded pair's shapes, at 2k to 32k cached entries, in float32 and bfloat16.

    python benchmarks/decode_attention.py results/cpu-bfloat16/decode_attention.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

SHAPES = {"draft (0.5B)": (14, 2, 64), "target (1.5B)": (12, 2, 128)}  # query heads, KV heads, head size
LENGTHS = (2048, 8192, 32768)


def milliseconds(call, repeats: int = 20) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def main(out: str) -> None:
    rows = []
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for model, (heads, kv_heads, dim) in SHAPES.items():
            for length in LENGTHS:
                for dtype in (torch.float32, torch.bfloat16):
                    query = torch.randn(1, heads, 1, dim, generator=generator).to(dtype)
                    key = torch.randn(1, kv_heads, length, dim, generator=generator).to(dtype)
                    value = torch.randn(1, kv_heads, length, dim, generator=generator).to(dtype)
                    stacked = query.reshape(1, kv_heads, heads // kv_heads, dim)
                    grouped = milliseconds(lambda q=query, k=key, v=value: F.scaled_dot_product_attention(
                        q, k, v, enable_gqa=True))
                    mine = milliseconds(lambda q=stacked, k=key, v=value: F.scaled_dot_product_attention(q, k, v))
                    rows.append({"model": model, "cached": length, "dtype": str(dtype).removeprefix("torch."),
                                 "grouped_ms": round(grouped, 3), "stacked_ms": round(mine, 3),
                                 "speedup": round(grouped / mine, 1)})
                    print(rows[-1], flush=True)
    with open(out, "w", encoding="utf-8") as handle:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
