"""Paired comparison of the checked-guess rows here with dense and the paper's rows of results/ruler-4096
(same samples, same keys). Run from the repository root: python results/ruler-4096-checked/compare.py"""

import json
import math
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
SETTINGS = [("speckv", 256, None, "SpecKV@256"), ("ada-speckv", 256, None, "Ada-SpecKV@256"),
            ("speckv-pc", 256, 1024, "SpecKV-PC@256/1024")]
SHORT = {"niah_single_1": "s1", "niah_single_2": "s2", "niah_single_3": "s3", "niah_multikey_1": "mk1",
         "niah_multikey_2": "mk2", "niah_multikey_3": "mk3", "niah_multiquery": "mq", "niah_multivalue": "mv",
         "vt": "vt", "cwe": "cwe", "fwe": "fwe"}


def load(path: Path) -> dict:
    rows = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[(row["method"], row["budget"], row["prompt_budget"], row["sample"])] = row
    return rows


def margin(a: dict, b: dict) -> str:
    diffs = [a[k] - b[k] for k in sorted(set(a) & set(b))]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    return f"{mean:+.1f} ±{se:.1f} ({sum(d > 0 for d in diffs)} better, {sum(d < 0 for d in diffs)} worse)"


checked_rows = load(HERE / "results.jsonl")
paper_rows = load(HERE.parent / "ruler-4096" / "results.jsonl")
dense = {k[3]: r for k, r in paper_rows.items() if k[0] == "dense"}
samples = sorted({k[3] for k in checked_rows})
tasks = [t for t in SHORT if any(dense[s]["task"] == t for s in samples)]


def by_task(scores: dict) -> list[str]:
    per_task = defaultdict(list)
    for sample, score in scores.items():
        per_task[dense[sample]["task"]].append(score)
    return [f"{sum(per_task[t]) / len(per_task[t]):.0f}" for t in tasks]


print(f"{len(samples)} samples\n")
print("| setting | " + " | ".join(SHORT[t] for t in tasks) + " | average | of dense |")
print("|---|" + "---|" * (len(tasks) + 2))
dense_scores = {s: dense[s]["score"] for s in samples}
dense_mean = sum(dense_scores.values()) / len(samples)
print(f"| dense | {' | '.join(by_task(dense_scores))} | {dense_mean:.1f} | 100% |")
margins, accepted = [], []
for method, budget, prompt_budget, label in SETTINGS:
    checked = {k[3]: r["score"] for k, r in checked_rows.items() if k[:3] == (method, budget, prompt_budget)}
    paper = {s: paper_rows[(method, budget, prompt_budget, s)]["score"] for s in checked}
    for name, scores in ((f"{label}, paper", paper), (f"{label}, checked guess", checked)):
        mean = sum(scores.values()) / len(scores)
        print(f"| {name} | {' | '.join(by_task(scores))} | {mean:.1f} | {100 * mean / dense_mean:.1f}% |")
    margins.append(f"| {label} | {margin(checked, dense_scores)} | {margin(checked, paper)} |")
    kept = [r["stats"] for k, r in checked_rows.items() if k[:3] == (method, budget, prompt_budget)]
    whole = sum(s["accepted_guess_tokens"] >= s["new_tokens"] for s in kept)
    none = sum(s["accepted_guess_tokens"] == 0 for s in kept)
    mean_kept = sum(s["accepted_guess_tokens"] for s in kept) / len(kept)
    accepted.append(f"| {label} | {mean_kept:.1f} | {whole} | {none} |")
print("\n| checked guess | against dense | against the paper's method |\n|---|---|---|")
print("\n".join(margins))
print("\n| setting | guess tokens kept, mean | whole answer from the guess | no guess token kept |\n|---|---|---|---|")
print("\n".join(accepted))
