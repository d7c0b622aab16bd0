"""What `speculate=auto` measures, on this machine, for a model pair: a target call reading 1, 2, 3, 5
and 9 tokens and a draft step, over caches of several lengths, and what auto would choose from them.

    python benchmarks/speculation_costs.py --lengths 128,2048 --out results/speculation-costs-cpu/costs.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from draftkv import load_pair
from draftkv.engine.speculation import AUTO_MOST, measure_costs
from draftkv.models import DEFAULT_DRAFT, DEFAULT_TARGET


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=DEFAULT_TARGET)
    parser.add_argument("--draft", default=DEFAULT_DRAFT)
    parser.add_argument("--lengths", default="128,2048")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    pair = load_pair(args.target, args.draft)
    rows = []
    for length in [int(part) for part in args.lengths.split(",")]:
        costs = measure_costs(pair.target.model, pair.draft.model, length)
        row = {"cache_tokens": length, "target_ms": {width: 1e3 * s for width, s in costs.target.items()},
               "draft_step_ms": 1e3 * costs.draft_step, "auto_chooses": costs.best(AUTO_MOST),
               "gain_by_proposals": {k: costs.gain(k) for k in range(1, AUTO_MOST + 1)}, "summary": costs.summary()}
        for rate in (0.5, 0.7, 0.9):
            costs.accepted, costs.proposed = rate, 1.0
            row[f"auto_chooses_at_acceptance_{rate}"] = costs.best(AUTO_MOST)
        print(json.dumps(row))
        rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": str(pair.target.model.device), "target": pair.target.name,
                                    "draft": pair.draft.name, "rows": rows}, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
