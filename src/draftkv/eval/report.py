"""Tables and plots from a finished (or partly finished) results folder."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

from ..errors import ConfigError
from ..jsonl import read_rows
from ..plotting import line_styles


def summarize(rows: list[dict]) -> tuple[list[str], list[tuple[str, int | None, int | None]], dict]:
    """Tasks, settings (method, kv budget, prompt budget) and {(task, setting): (mean score, count)}."""
    scores: dict[tuple[str, tuple], list[float]] = defaultdict(list)
    for row in rows:
        setting = (row["method"], row["budget"], row["prompt_budget"])
        scores[(row["task"], setting)].append(row["score"])
        scores[("average", setting)].append(row["score"])
    tasks = sorted({task for task, _ in scores if task != "average"}) + ["average"]
    order = {"dense": 0}
    found = sorted({setting for _, setting in scores},
                   key=lambda s: (order.get(s[0], 1), s[0], s[1] or 0, s[2] or 0))
    return tasks, found, {k: (sum(v) / len(v), len(v)) for k, v in scores.items()}


def label(setting: tuple) -> str:
    method, budget, prompt_budget = setting
    parts = [f"kv {budget}" if budget is not None else "", f"prompt {prompt_budget}" if prompt_budget is not None else ""]
    return method + (f" ({', '.join(filter(None, parts))})" if any(parts) else "")


def report(folder: Path) -> tuple[Path, Path, Path]:
    """Write summary.md, summary.csv and accuracy.png in `folder`; returns their paths."""
    rows = read_rows(folder / "results.jsonl")
    if not rows:
        raise ConfigError(f"{folder} has no finished results (results.jsonl is missing or empty)")
    tasks, found, table = summarize(rows)
    header = ["setting", *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    with open(folder / "summary.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "kv_budget", "prompt_budget", "task", "score", "samples"])
        for setting in found:
            cells = []
            for task in tasks:
                if (task, setting) in table:
                    mean, count = table[(task, setting)]
                    cells.append(f"{mean:.1f} (n={count})")
                    writer.writerow([*setting, task, f"{mean:.2f}", count])
                else:
                    cells.append("-")
            lines.append("| " + " | ".join([label(setting), *cells]) + " |")
    (folder / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(table, found, folder / "accuracy.png")
    return folder / "summary.md", folder / "summary.csv", folder / "accuracy.png"


def plot(table: dict, found: list[tuple], path: Path) -> None:
    """Average accuracy against budget, one line per method (dense as a horizontal reference)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 4.5))
    by_method: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for setting in found:
        method, budget, prompt_budget = setting
        mean = table[("average", setting)][0]
        if method == "dense":
            axis.axhline(mean, color="black", linestyle="--", label="dense")
        else:
            by_method[method if budget is None or prompt_budget is None else f"{method} (prompt {prompt_budget})"
                      ].append((budget if budget is not None else prompt_budget, mean))
    styles = line_styles(sorted(by_method))
    for method, points in sorted(by_method.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], label=method, **styles[method])
    axis.set_xscale("log", base=2)
    axis.set_xlabel("budget (KV entries per head, or prompt tokens for prompt methods)")
    axis.set_ylabel("average score")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
