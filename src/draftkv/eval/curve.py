"""Score against compression ratio: the leaderboard's view of a run that swept several budgets.

A setting's column is the share of the cache it keeps as it was asked for: a KV ratio, a prompt ratio,
their product for a cascade (speckv-pc keeps `budget` of the `prompt_budget` it kept), or a count of KV
entries per head. On the plot every setting stands at the compression ratio it measured (one minus the
entries it kept over dense's, averaged over samples), so a count and a ratio share one axis."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from ..plotting import line_styles, save_scores
from .report import Estimate, estimate, label, setting_of

Column = tuple[str, float]  # ("ratio", share kept) or ("entries", KV entries per head)


def column_of(setting: tuple) -> Column | None:
    """The column a setting belongs to, or None for dense (its line is the reference)."""
    method, budget, prompt_budget = setting
    if method == "dense":
        return None
    if isinstance(budget, float) and (prompt_budget is None or isinstance(prompt_budget, float)):
        return "ratio", round(budget * (prompt_budget or 1.0), 4)
    if budget is None and isinstance(prompt_budget, float):
        return "ratio", prompt_budget
    return "entries", float(budget if budget is not None else prompt_budget)


def column_text(column: Column) -> str:
    kind, value = column
    return f"{1 - value:.2f} ({value:g} kept)" if kind == "ratio" else f"{value:g} entries"


def uses_draft(method: str) -> bool:
    """Is `method` (a row's method name, its parameters in brackets) one of the draft-based methods?"""
    from ..errors import DraftKVError
    from ..methods import get_method

    try:
        return get_method(method.split("(")[0]).uses_draft(64)
    except DraftKVError:  # a method this version no longer has
        return False


def sample_of(row: dict, index: int) -> str:
    """What pairs a row with the other settings' rows on the same sample."""
    return str(row.get("sample") or row.get("key") or index)


def measured_ratio(rows: list[dict]) -> dict[tuple, float]:
    """Per setting, its mean compression ratio: 1 - KV entries kept per head / dense's on the sample (the
    prompt's tokens where dense did not run on it)."""
    full = {sample_of(row, i): row["stats"]["kv_entries"] for i, row in enumerate(rows)
            if row["method"] == "dense" and isinstance((row.get("stats") or {}).get("kv_entries"), int)}
    ratios: dict[tuple, list[float]] = defaultdict(list)
    for i, row in enumerate(rows):
        stats = row.get("stats") or {}
        whole = full.get(sample_of(row, i)) or stats.get("prompt_tokens")
        if isinstance(stats.get("kv_entries"), int) and whole:
            ratios[setting_of(row)].append(1 - stats["kv_entries"] / whole)
    return {setting: statistics.fmean(values) for setting, values in ratios.items()}


def curve_lines(rows: list[dict], plot_path: Path) -> list[str]:
    """A markdown section (table, paired margins) and the plot at `plot_path`; no lines when the run has
    fewer than two budget columns."""
    scores: dict[tuple, dict[str, float]] = defaultdict(dict)
    for i, row in enumerate(rows):
        scores[setting_of(row)][sample_of(row, i)] = row["score"]
    columns = sorted({c for s in scores if (c := column_of(s)) is not None}, key=lambda c: (c[0] == "entries", -c[1]))
    if len(columns) < 2:
        return []
    methods = sorted({s[0] for s in scores if s[0] != "dense"}, key=lambda m: (uses_draft(m), m))
    cell: dict[tuple[str, Column], tuple] = {}
    for setting in sorted(scores, key=str):
        if (column := column_of(setting)) is not None:
            line = setting[0] if (setting[0], column) not in cell else label(setting)  # two pairings, one column
            if line not in methods:
                methods.append(line)
            cell[(line, column)] = setting
    methods.sort(key=lambda m: (uses_draft(m), m))
    dense = next((s for s in scores if s[0] == "dense"), None)

    def mean(setting: tuple) -> float:
        return statistics.fmean(scores[setting].values())

    lines = ["", "## Against the compression ratio", "",
             "Average score per setting (columns: compression ratio, the share of the cache removed, with the share "
             "kept; or KV entries per head). A cascade (speckv-pc) stands at its KV share times its prompt share. "
             "Draft-based methods last.", "",
             "| method | " + " | ".join(column_text(c) for c in columns) + " |", "|---|" + "---|" * len(columns)]
    if dense is not None:
        lines.append(f"| dense | {mean(dense):.1f} (n={len(scores[dense])}) |" + " |" * (len(columns) - 1))
    for method in methods:
        cells = [f"{mean(s):.1f}" + (f" ({label(s).split(' (')[-1].rstrip(')')})" if s[0] == "speckv-pc" else "")
                 if (s := cell.get((method, c))) else "-" for c in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += margins(scores, cell, methods, columns)
    plot_curve(scores, cell, methods, columns, dense, measured_ratio(rows), plot_path)
    lines += ["", f"![score against compression ratio]({plot_path.name})"]
    return lines


def margins(scores: dict, cell: dict, methods: list[str], columns: list[Column]) -> list[str]:
    """Each draft-based method against the best baseline of its column, paired over the samples both ran."""
    ours = [m for m in methods if uses_draft(m)]
    theirs = [m for m in methods if not uses_draft(m)]
    if not ours or not theirs:
        return []
    lines = ["", "Paired margins: each draft-based method minus the best baseline of the column (the highest "
             "average), over the samples both ran, ± one standard error (samples better / worse).", "",
             "| | " + " | ".join(column_text(c) for c in columns) + " |", "|---|" + "---|" * len(columns)]
    for method in ours:
        cells = []
        for column in columns:
            mine = cell.get((method, column))
            rivals = [cell[(m, column)] for m in theirs if (m, column) in cell]
            if mine is None or not rivals:
                cells.append("-")
                continue
            best = max(rivals, key=lambda s: statistics.fmean(scores[s].values()))
            pairs = [(scores[mine][k], scores[best][k]) for k in scores[mine] if k in scores[best]]
            if not pairs:
                cells.append(f"no shared sample with {best[0]}")
                continue
            margin: Estimate = estimate([a - b for a, b in pairs])
            better, worse = sum(a > b for a, b in pairs), sum(a < b for a, b in pairs)
            cells.append(f"{margin.text.replace(f' (n={margin.samples})', '')} vs {best[0]} ({better}/{worse})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def plot_curve(scores: dict, cell: dict, methods: list[str], columns: list[Column], dense: tuple | None,
               ratios: dict[tuple, float], path: Path) -> None:
    """Average score against the measured compression ratio, one line per method, dense dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4.5))
    if dense is not None:
        axis.axhline(statistics.fmean(scores[dense].values()), color="black", linestyle="--", label="dense")
    styles = line_styles(methods)
    for method in methods:
        points = sorted((ratios[s], statistics.fmean(scores[s].values())) for c in columns
                        if (s := cell.get((method, c))) is not None and s in ratios)
        if points:
            axis.plot([x for x, _ in points], [y for _, y in points], label=method, **styles[method])
    save_scores(figure, axis, path, "compression ratio (share of the KV cache removed, measured)")
