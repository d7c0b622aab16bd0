"""The lm-eval runs beside the runner's rows for the same samples: sample 0 of each task, as today's code
scored it in results/ruler-2048-batched (results/ruler-2048 holds them too, scored before the
tie-breaking rule).

    python results/lm-eval-ruler/compare.py   # prints the markdown table of the README
"""

import json
from pathlib import Path

HERE = Path(__file__).parent
RUNNER = HERE.parent / "ruler-2048-batched" / "results.jsonl"
SETTINGS = {"dense": ("dense", None), "snapkv-128": ("snapkv", 128), "speckv-128": ("speckv", 128)}


def lm_eval_rows(folder: Path) -> dict[str, dict]:
    (samples,) = folder.rglob("samples_draftkv_ruler_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    return {row["doc"]["id"]: {"score": row["score"], "prediction": row["filtered_resps"][0]} for row in rows}


def same_prediction(ours: str, theirs: str) -> bool:
    """Equal up to where the shorter one stops: the task gives every sample 128 new tokens at most, the
    runner each task its own limit (30 for vt, for example)."""
    ours, theirs = ours.strip(), theirs.strip()
    return ours.startswith(theirs) or theirs.startswith(ours)


def main() -> None:
    runner = [json.loads(line) for line in RUNNER.read_text().splitlines()]
    print("| setting | lm-eval score | runner score (same samples) | same prediction | same score |")
    print("|---|---|---|---|---|")
    for name, (method, budget) in SETTINGS.items():
        ours = lm_eval_rows(HERE / name)
        theirs = {r["sample"]: r for r in runner
                  if r["method"] == method and r["budget"] == budget and r["prompt_budget"] is None and r["sample"] in ours}
        same_text = sum(same_prediction(ours[k]["prediction"], theirs[k]["prediction"]) for k in theirs)
        same_score = sum(ours[k]["score"] == theirs[k]["score"] for k in theirs)
        mean = sum(r["score"] for r in ours.values()) / len(ours)
        runner_mean = sum(r["score"] for r in theirs.values()) / len(theirs)
        print(f"| {name} | {mean:.1f} (n={len(ours)}) | {runner_mean:.1f} (n={len(theirs)}) | "
              f"{same_text}/{len(theirs)} | {same_score}/{len(theirs)} |")
        for key in sorted(theirs):
            if ours[key]["score"] != theirs[key]["score"]:
                print(f"|  | {key}: {ours[key]['score']:.0f} {ours[key]['prediction'][:50]!r} | "
                      f"{theirs[key]['score']:.0f} {theirs[key]['prediction'][:50]!r} | | |")


if __name__ == "__main__":
    main()
