"""Every method on one long prompt, to show it runs to the target's full context without running out of
memory: one process per prompt length, all methods through the executor together (one draft pass, one
target prefill for dense and the KV methods, each method decoded before the next is compressed), a few new
tokens each. Writes one JSON line per method as it finishes (its stats, answer and the process's peak
resident memory so far) and a last line with the process's peak; a rerun skips the methods recorded.

    python benchmarks/long_prompts.py --length 32768 --out results/cpu-bfloat16/long_prompts.jsonl
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import draftkv
from draftkv.bench import bench_requests
from draftkv.flow import run_each
from draftkv.methods import budget_kinds, budget_params, get_method

KV_BUDGET, PROMPT_BUDGET = 1024, 2048


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--methods", default=",".join(draftkv.METHODS))
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    done = set()
    if args.out.is_file():  # a rerun goes on with the methods not yet recorded at this length
        rows = [json.loads(line) for line in args.out.read_text(encoding="utf-8").splitlines() if line.strip()]
        done = {row["method"] for row in rows if row.get("length") == args.length and "method" in row}
    pair = draftkv.load_pair(dtype=args.dtype)
    methods = []
    for name in [name for name in args.methods.split(",") if name not in done]:
        takes_kv, takes_prompt = budget_kinds(name)
        methods.append(get_method(name, **budget_params(name, KV_BUDGET if takes_kv else None,
                                                        PROMPT_BUDGET if takes_prompt else None)))
    if not methods:
        return
    request = bench_requests(pair.tokenizer, args.length, 1, args.new_tokens)[0]
    loaded, started = peak_rss(), time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as out:
        for index, (result,) in run_each(pair, [request], methods):
            out.write(json.dumps({"length": args.length, "method": methods[index].name, "params": methods[index].params(),
                                  "answer": result.text, "peak_rss_bytes_so_far": peak_rss(),
                                  "seconds_so_far": time.perf_counter() - started, "stats": result.stats.to_dict()})
                      + "\n")
            out.flush()
            print(methods[index].name, result.stats.summary()[:160], flush=True)
        out.write(json.dumps({"length": args.length, "done": True, "methods": len(methods),
                              "peak_rss_bytes": peak_rss(), "peak_rss_after_loading_bytes": loaded,
                              "seconds": time.perf_counter() - started}) + "\n")


if __name__ == "__main__":
    main()
