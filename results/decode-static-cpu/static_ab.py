"""The static decode step against the eager one on this CPU (issue 19: CPU speed must not regress).

    python results/decode-static-cpu/static_ab.py --length 2048 --repeats 3 --out results/decode-static-cpu

The embedded pair, the benchmark's prompt, 32 new tokens (end-of-text ignored); backends interleaved
within each repeat, dense and SnapKV (budget 256), batch 1 and 4. Prints and writes the medians.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from draftkv import bench
from draftkv.methods import get_method
from draftkv.models import load_pair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pair = load_pair(draft=None)
    methods = [("dense", {}), ("snapkv", {"budget": 256})]
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        requests = bench.bench_requests(pair.tokenizer, args.length, batch, 32)
        for repeat in range(-1, args.repeats):  # repeat -1 warms up
            for backend in ("eager", "static"):
                chosen = dataclasses.replace(pair, decode=backend)
                for name, params in methods:
                    row = bench.measure(chosen, get_method(name, **params), requests)
                    if repeat >= 0:
                        rows.append({"backend": backend, "method": name, "batch": batch, "repeat": repeat,
                                     "decode_ms_per_token": row["decode_ms_per_token"], "answer": row["answer"]})
                        print(rows[-1], flush=True)
    summary = {}
    for row in rows:
        summary.setdefault(f"{row['method']} batch {row['batch']} {row['backend']}", []).append(row["decode_ms_per_token"])
    medians = {key: statistics.median(values) for key, values in summary.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "static_ab.json").write_text(json.dumps({"rows": rows, "medians": medians}, indent=1) + "\n")
    for key, value in medians.items():
        print(f"{key}: {value:.0f} ms per token")


if __name__ == "__main__":
    main()
