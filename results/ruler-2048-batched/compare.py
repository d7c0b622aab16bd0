"""The batching check: this folder's rows (settings decoded as one batch) against the same keys in
another run (default results/ruler-2048, each setting decoded on its own). Prints markdown.

    python results/ruler-2048-batched/compare.py [OTHER_FOLDER ...]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent


def rows(folder: Path) -> dict[str, dict]:
    found = {}
    for line in (folder / "results.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            found[row["key"]] = row
    return found


def main() -> None:
    batched = rows(HERE)
    for other_folder in [Path(p) for p in sys.argv[1:]] or [Path("results/ruler-2048")]:
        other = rows(other_folder)
        shared = [key for key in batched if key in other]
        same = [key for key in shared if batched[key]["prediction"] == other[key]["prediction"]]
        print(f"## Against `{other_folder}`\n")
        print(f"{len(same)} of {len(shared)} rows give the identical prediction ({100 * len(same) / len(shared):.1f}%); "
              f"score {sum(batched[k]['score'] for k in shared) / len(shared):.1f} batched, "
              f"{sum(other[k]['score'] for k in shared) / len(shared):.1f} there.\n")
        if len(same) < len(shared):
            print("| key | batched | there | score |\n|---|---|---|---|")
            for key in shared:
                if key not in same:
                    print(f"| {key} | {batched[key]['prediction']!r} | {other[key]['prediction']!r} | "
                          f"{batched[key]['score']:.0f} / {other[key]['score']:.0f} |")
            print()
        seconds_here, seconds_there = defaultdict(float), defaultdict(float)
        for key in shared:
            seconds_here[batched[key]["sample"]] += batched[key]["seconds"]
            seconds_there[other[key]["sample"]] += other[key]["seconds"]
        complete = [s for s in seconds_here if sum(1 for k in shared if batched[k]["sample"] == s) ==
                    sum(1 for k in batched if batched[k]["sample"] == s)]
        if complete:
            here = sum(seconds_here[s] for s in complete) / len(complete)
            there = sum(seconds_there[s] for s in complete) / len(complete)
            print(f"Wall time per sample (all its settings), mean over {len(complete)} samples: {here:.0f} s batched, "
                  f"{there:.0f} s there ({here / there:.2f}).\n")


if __name__ == "__main__":
    main()
