"""Paired comparison of the bfloat16 rows here with the committed float32 rows of the same samples (dense,
SnapKV@256 and SpecPC@1024 from results/ruler-4096; SpecKV@256 with the checked guess, today's default,
from results/ruler-4096-checked). Run from the repository root: python results/ruler-4096-bf16/compare.py"""

import json
import math
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
# (method, KV budget, prompt budget, label, the folder of its float32 rows)
SETTINGS = [("dense", None, None, "dense", "ruler-4096"), ("snapkv", 256, None, "SnapKV@256", "ruler-4096"),
            ("speckv", 256, None, "SpecKV@256 (checked guess)", "ruler-4096-checked"),
            ("specpc", None, 1024, "SpecPC@1024", "ruler-4096")]
SHORT = {"niah_single_1": "s1", "niah_single_2": "s2", "niah_single_3": "s3", "niah_multikey_1": "mk1",
         "niah_multikey_2": "mk2", "niah_multikey_3": "mk3", "niah_multiquery": "mq", "niah_multivalue": "mv",
         "vt": "vt", "cwe": "cwe", "fwe": "fwe"}


def load(path: Path) -> dict:
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[(row["method"], row["budget"], row["prompt_budget"], row["sample"])] = row
    return rows


def margin(diffs: list[float]) -> tuple[float, float]:
    n, mean = len(diffs), sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n) if n > 1 else float("nan")
    return mean, se


ours = load(HERE / "results.jsonl")
theirs = {folder: load(HERE.parent / folder / "results.jsonl") for folder in {s[4] for s in SETTINGS}}
samples = sorted({k[3] for k in ours})
tasks = [t for t in SHORT if any(k[3].startswith(t + "-") for k in ours)]


def by_task(scores: dict) -> list[str]:
    per_task = defaultdict(list)
    for sample, score in scores.items():
        per_task[sample.rsplit("-", 3)[0]].append(score)
    return [f"{sum(per_task[t]) / len(per_task[t]):.0f}" if per_task[t] else "-" for t in tasks]


print(f"{len(samples)} samples with bfloat16 rows\n")
print("| setting | dtype | " + " | ".join(SHORT[t] for t in tasks) + " | average | n |")
print("|---|---|" + "---|" * (len(tasks) + 2))
lines = []
for method, budget, prompt_budget, label, folder in SETTINGS:
    mine = {k[3]: r for k, r in ours.items() if k[:3] == (method, budget, prompt_budget)}
    old = {s: theirs[folder][(method, budget, prompt_budget, s)] for s in mine
           if (method, budget, prompt_budget, s) in theirs[folder]}
    paired = sorted(set(mine) & set(old))
    if not paired:
        continue
    for dtype, rows in (("float32", old), ("bfloat16", mine)):
        scores = {s: rows[s]["score"] for s in paired}
        print(f"| {label} | {dtype} | {' | '.join(by_task(scores))} | {sum(scores.values()) / len(paired):.1f} | "
              f"{len(paired)} |")
    diffs = [mine[s]["score"] - old[s]["score"] for s in paired]
    mean, se = margin(diffs)
    same = sum(mine[s]["prediction"] == old[s]["prediction"] for s in paired)
    lines.append(f"| {label} | {mean:+.1f} ±{se:.1f} | {sum(d > 0 for d in diffs)} | {sum(d < 0 for d in diffs)} | "
                 f"{same} of {len(paired)} | {'yes' if abs(mean) <= 1.5 else 'no'} |")
print("\nPaired margin, bfloat16 - float32 (± one standard error):\n")
print("| setting | margin | better | worse | same answer text | within 1.5 |")
print("|---|---|---|---|---|---|")
print("\n".join(lines))
