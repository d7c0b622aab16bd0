"""Encoding a batch of benchmark prompts: one tokenizer call per request against one for the batch.

    python benchmarks/tokenize_batch.py ~/.cache/draftkv/models/qwen2.5-coder-1.5b-instruct --length 32768 --batch 8

Both ways must give the same prompts; the script checks that, then prints the median of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformers import AutoTokenizer

from draftkv.bench import bench_requests
from draftkv.prompt import encode_prompt, encode_prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a model folder or hub id (only its tokenizer is read)")
    parser.add_argument("--length", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    requests = bench_requests(tokenizer, args.length, args.batch, new_tokens=1)
    per_request, batched = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        alone = [encode_prompt(tokenizer, request) for request in requests]
        per_request.append(time.perf_counter() - started)
        started = time.perf_counter()
        together = encode_prompts(tokenizer, requests)
        batched.append(time.perf_counter() - started)
        assert alone == together, "a batch must encode as each request alone"
    print(f"{args.batch} prompts of {args.length} tokens: one call per request "
          f"{statistics.median(per_request):.3f} s, one call for the batch {statistics.median(batched):.3f} s "
          f"(median of {args.repeats})")


if __name__ == "__main__":
    main()
