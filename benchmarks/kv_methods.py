"""Every KV method on one ~2k-token prompt of the embedded pair: answer, KV bytes, time; and the
per-head budgets Ada-SpecKV gives each layer (a plot).

    python benchmarks/kv_methods.py --budget 256 --out results/kv-methods

Methods run one after another in one process after a warm-up; decode time per token is what the
ragged-cache layouts are compared on.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import draftkv
from draftkv.synthetic import LAUNCH_QUESTION

NOTES = Path(__file__).parent.parent / "examples" / "notes.txt"
RUNS = [
    ("dense", {}),
    ("streamingllm", {}),
    ("h2o", {}),
    ("snapkv", {}),
    ("pyramidkv", {}),
    ("ada-snapkv", {"layout": "padded"}),
    ("ada-snapkv", {"layout": "per-head"}),
    ("speckv", {}),
    ("ada-speckv", {"layout": "padded"}),
    ("ada-speckv", {"layout": "per-head"}),
    ("laq", {}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--out", type=Path, default=Path("results/kv-methods"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    pair = draftkv.load_pair()
    notes = NOTES.read_text(encoding="utf-8")
    draftkv.generate(pair, notes[:2000], LAUNCH_QUESTION, method="speckv", budget=128, max_new_tokens=2)  # warm-up

    rows = []
    for method, params in RUNS:
        budget = {} if method == "dense" else {"budget": args.budget}
        result = draftkv.generate(pair, notes, LAUNCH_QUESTION, method=method, max_new_tokens=args.new_tokens,
                                  **budget, **params)
        stats = result.stats
        steps = max(stats.new_tokens - 1, 1)
        row = {
            "method": method, **params, "answer": result.text,
            "correct": bool(re.search(r"14(th)?\s+(of\s+)?October|October\s+14", result.text, re.IGNORECASE)),
            "prompt_tokens": stats.prompt_tokens, "kv_entries": stats.kv_entries, "kv_bytes": stats.kv_bytes,
            "kv_bytes_stored": stats.kv_bytes_stored, "kv_bytes_dense": stats.kv_bytes_dense,
            "ttft": stats.time_to_first_token, "total": stats.total_time,
            "decode_ms_per_token": 1000 * stats.timings.get("decode", 0.0) / steps, "timings": stats.timings,
        }
        if method == "ada-speckv" and params.get("layout") == "padded":
            row["head_budgets"] = [(kept >= 0).sum(dim=-1).tolist() for kept in result.kept_positions]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "head_budgets"}), flush=True)
        (args.out / "runs.json").write_text(json.dumps(rows, indent=1))

    lines = ["| method | answer | correct | KV entries / head | KV bytes (stored) | TTFT | decode ms/token | total |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        name = row["method"] + (f" ({row['layout']})" if "layout" in row else "")
        stored = f" ({row['kv_bytes_stored'] / 2**20:.2f})" if row["kv_bytes_stored"] != row["kv_bytes"] else ""
        lines.append(f"| {name} | {row['answer'].strip()[:70]} | {'yes' if row['correct'] else 'no'} | "
                     f"{row['kv_entries']} | {row['kv_bytes'] / 2**20:.2f} MiB{stored} | {row['ttft']:.1f} s | "
                     f"{row['decode_ms_per_token']:.0f} | {row['total']:.1f} s |")
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_head_budgets(next(r["head_budgets"] for r in rows if "head_budgets" in r), args.budget, args.out / "ada_speckv_head_budgets.png")


def plot_head_budgets(head_budgets: list[list[int]], budget: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4))
    for head in range(len(head_budgets[0])):
        axis.plot([layer[head] for layer in head_budgets], marker="o", label=f"KV head {head}")
    axis.axhline(budget, color="grey", linestyle="--", label=f"uniform budget {budget}")
    axis.set_xlabel("layer")
    axis.set_ylabel("entries kept")
    axis.set_title("Ada-SpecKV: per-head budgets across layers (~2k-token prompt)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
