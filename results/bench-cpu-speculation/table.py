"""The issue's configurations from runs.jsonl: medians over repeats, ratios to dense at the same length.
Run from the repository root: python results/bench-cpu-speculation/table.py [another folder's runs.jsonl]"""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

ROWS = [  # (label in runs.jsonl, name in the table)
    ("dense", "dense"),
    ("dense +speculate=4", "dense + speculate 4"),
    ("speckv(budget=256,verify_lookahead=False)", "SpecKV, paper"),
    ("speckv(budget=256)", "SpecKV + checked guess"),
    ("speckv(budget=256) +speculate=4", "SpecKV + checked guess + speculate 4"),
    ("specpc(budget=1024)", "SpecPC"),
    ("specpc(budget=1024) +speculate=4", "SpecPC + speculate 4"),
    ("speckv-pc(budget=256,prompt_budget=1024)", "SpecKV-PC + checked guess"),
    ("speckv-pc(budget=256,prompt_budget=1024) +speculate=4", "SpecKV-PC + checked guess + speculate 4"),
    ("dense +speculate=auto", "dense + speculate auto"),
    ("speckv(budget=256) +speculate=auto", "SpecKV + checked guess + speculate auto"),
    ("specpc(budget=1024) +speculate=auto", "SpecPC + speculate auto"),
    ("speckv-pc(budget=256,prompt_budget=1024) +speculate=auto", "SpecKV-PC + checked guess + speculate auto"),
]
RUNS = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "runs.jsonl"
runs = defaultdict(list)
for line in RUNS.read_text(encoding="utf-8").splitlines():
    row = json.loads(line)
    if row.get("repeat", 0) >= 0 and "error" not in row:
        runs[(row["length"], row["label"])].append(row)


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


for length in sorted({length for length, _ in runs}):
    dense = runs.get((length, "dense"))
    print(f"\n{length} tokens ({dense[0]['prompt_tokens'] if dense else '?'} in the prompt), 128 new tokens\n")
    print("| setting | n | TTFT s | end-to-end s | e2e / dense | decode ms/token | guess tokens kept | proposals kept "
          "| target calls | KV target MiB | KV draft MiB | answer right |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for label, name in ROWS:
        rows = runs.get((length, label))
        if not rows:
            continue
        e2e = median(rows, "e2e_s")
        ratio = f"{e2e / median(dense, 'e2e_s'):.2f}" if dense else "-"
        proposed = sum(r["proposed_tokens"] for r in rows)
        kept = f"{sum(r['accepted_proposals'] for r in rows)} of {proposed}" if proposed else "-"
        calls = f"{median(rows, 'target_calls'):.0f}" if proposed else "-"
        print(f"| {name} | {len(rows)} | {median(rows, 'ttft_s'):.1f} | {e2e:.1f} | {ratio} | "
              f"{median(rows, 'decode_ms_per_token'):.0f} | {median(rows, 'accepted_guess_tokens'):.0f} | {kept} | "
              f"{calls} | {median(rows, 'kv_bytes') / 2**20:.1f} | {median(rows, 'draft_kv_bytes') / 2**20:.1f} | "
              f"{sum(r['correct'] for r in rows)} of {len(rows)} |")
    for label, name in ROWS:
        rows = runs.get((length, label))
        if rows:
            stages = defaultdict(list)
            for r in rows:
                for stage, seconds in r["timings"].items():
                    stages[stage].append(seconds)
            # The target's prefill of the whole prompt is the same work for dense and the KV methods, and
            # its time varied most between runs: what each setting adds or saves shows best without it.
            rest = statistics.median(r["e2e_s"] - r["timings"].get("target_prefill", 0.0) for r in rows)
            print(f"- {name}: end to end less the target's prefill {rest:.1f}; stages: "
                  + ", ".join(f"{s} {statistics.median(v):.1f}" for s, v in stages.items() if
                              statistics.median(v) >= 0.05))
            for note in sorted({r["note"] for r in rows if "speculation" in r["note"]}):
                print(f"  - note: {note}")
