"""Time to first token of SpecPC against dense on the embedded pair, at several prompt lengths.

    python benchmarks/specpc_ttft.py --lengths 4096,8192 --budget 1024 --out results/specpc-ttft

One process, the same inputs, methods interleaved after a short warm-up; ratios are taken within
the run (absolute seconds on shared machines are noise). Each row also checks the answer, so speed
never stands without the accuracy it cost.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import draftkv
from draftkv.prompt import encode_prompt
from draftkv.synthetic import LAUNCH_QUESTION, notes_context
from draftkv.types import Request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="4096,8192", help="prompt lengths in tokens, comma-separated")
    parser.add_argument("--budget", type=int, default=1024, help="SpecPC prompt budget")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("results/specpc-ttft"))
    args = parser.parse_args()

    pair = draftkv.load_pair()
    args.out.mkdir(parents=True, exist_ok=True)
    # Warm-up: one short run of each method, so one-time costs do not land on the first measurement.
    warm = notes_context(600, pair.tokenizer, seed=99)
    for method, params in (("dense", {}), ("specpc", {"budget": 256})):
        draftkv.generate(pair, warm, LAUNCH_QUESTION, method=method, max_new_tokens=2, **params)

    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        overhead = len(encode_prompt(pair.tokenizer, Request(context="x", question=LAUNCH_QUESTION)).ids) - 1
        context = notes_context(length - overhead, pair.tokenizer, seed=length)
        for repeat in range(args.repeats):
            for method, params in (("dense", {}), ("specpc", {"budget": args.budget})):
                started = time.time()
                result = draftkv.generate(pair, context, LAUNCH_QUESTION, method=method,
                                          max_new_tokens=args.new_tokens, **params)
                stats = result.stats
                correct = bool(re.search(r"14(th)?\s+(of\s+)?October|October\s+14", result.text, re.IGNORECASE))
                rows.append({"length": length, "repeat": repeat, "method": method, "prompt_tokens": stats.prompt_tokens,
                             "kept_prompt_tokens": stats.kept_prompt_tokens, "ttft": stats.time_to_first_token,
                             "total": stats.total_time, "timings": stats.timings, "answer": result.text,
                             "correct": correct, "kv_bytes": stats.kv_bytes, "wall": time.time() - started})
                print(json.dumps(rows[-1]), flush=True)
                (args.out / "runs.json").write_text(json.dumps(rows, indent=1))

    lines = ["| prompt tokens | dense TTFT | SpecPC TTFT | ratio | SpecPC: draft prefill + scoring + lookahead | "
             "selection | target prefill | dense answer | SpecPC answer |", "|---|---|---|---|---|---|---|---|---|"]
    for length in sorted({r["length"] for r in rows}):
        dense = [r for r in rows if r["length"] == length and r["method"] == "dense"]
        spec = [r for r in rows if r["length"] == length and r["method"] == "specpc"]
        d_ttft = sorted(r["ttft"] for r in dense)[len(dense) // 2]
        s_row = sorted(spec, key=lambda r: r["ttft"])[len(spec) // 2]
        t = s_row["timings"]
        draft = t.get("draft_prefill", 0) + t.get("draft_scoring", 0) + t.get("draft_lookahead", 0)
        lines.append(
            f"| {dense[0]['prompt_tokens']} | {d_ttft:.1f} s | {s_row['ttft']:.1f} s | {s_row['ttft'] / d_ttft:.2f} | "
            f"{t.get('draft_prefill', 0):.1f} + {t.get('draft_scoring', 0):.1f} + {t.get('draft_lookahead', 0):.1f} "
            f"= {draft:.1f} s | {t.get('prompt_selection', 0):.2f} s | {t.get('target_prefill', 0):.1f} s | "
            f"{'correct' if dense[0]['correct'] else 'wrong'} | {'correct' if s_row['correct'] else 'wrong'} |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
