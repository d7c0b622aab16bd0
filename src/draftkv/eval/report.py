"""Tables and plots from a finished (or partly finished) results folder."""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..jsonl import read_rows, writing
from ..plotting import line_styles, save_scores
from ..types import is_int, is_number
from . import metrics

Warn = Callable[[str], None]


def row_problem(row: object, needs_length: bool) -> str | None:
    """Why a JSON line is not a result row, or None when it is one."""
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}, not an object"
    for name in ("method", "task"):
        if not isinstance(row.get(name), str):
            return f"no {name}" if name not in row else f"{name} is {row[name]!r}, not text"
    score = row.get("score")
    if not is_number(score) or not math.isfinite(score):
        return "no score" if "score" not in row else f"score is {score!r}, not a number"
    for name in ("budget", "prompt_budget"):
        value = row.get(name)
        if value is not None and not (is_int(value) and value >= 1) and not (is_number(value) and 0 < value <= 1):
            return f"{name} is {value!r}, neither a count (a whole number >= 1) nor a ratio in (0, 1]"
    if needs_length and not is_int(row.get("length")):
        return "no length" if "length" not in row else f"length is {row['length']!r}, not a whole number"
    return None


def load_results(folders: list[Path], warn: Warn, needs_length: bool = False) -> list[dict]:
    """The result rows of each folder's results.jsonl. A missing folder or file is an error; a line that
    is not a result row (not UTF-8, not JSON, not an object, no method, task or numeric score) is skipped
    and counted; a row whose key was already read (two runs into one folder, two folders of one length)
    is counted once. Both are told to `warn`. A torn last line (a run in progress) is left out quietly."""
    rows: list[dict] = []
    seen: set[str] = set()  # (length, key) of each row read
    duplicates: list[str] = []
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"{folder} is not a results folder (it does not exist)")
        path = folder / "results.jsonl"
        if not path.is_file():
            raise ConfigError(f"{folder} has no results.jsonl; give a folder that a `draftkv eval` run wrote")
        data = path.read_bytes()
        lines = data.split(b"\n")[:-1]  # after the last newline: nothing, or a line still being written
        skipped: list[str] = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                skipped.append(f"line {number}: not UTF-8")
                continue
            except json.JSONDecodeError:
                skipped.append(f"line {number}: not JSON")
                continue
            if problem := row_problem(row, needs_length):
                skipped.append(f"line {number}: {problem}")
                continue
            row = {**row, "budget": row.get("budget"), "prompt_budget": row.get("prompt_budget")}
            key = str((row.get("length"), row.get("key") or (row.get("sample"), row["method"], row["budget"],
                                                              row["prompt_budget"])))
            if key in seen:
                duplicates.append(f"{path} line {number}")
                continue
            seen.add(key)
            rows.append(row)
        if skipped:
            warn(f"skipped {len(skipped)} line(s) of {path} that are not result rows ({'; '.join(skipped[:3])}"
                 f"{'; ...' if len(skipped) > 3 else ''})")
    if duplicates:
        warn(f"{len(duplicates)} row(s) repeat a result already read (two runs into one folder, or two folders "
             f"of one length); each was counted once ({', '.join(duplicates[:3])}{', ...' if len(duplicates) > 3 else ''})")
    return rows


def summarize(rows: list[dict]) -> tuple[list[str], list[tuple[str, int | None, int | None]], dict]:
    """Tasks, settings (method, kv budget, prompt budget) and {(task, setting): (mean score, count)}."""
    scores: dict[tuple[str, tuple], list[float]] = defaultdict(list)
    for row in rows:
        setting = setting_of(row)
        scores[(row["task"], setting)].append(row["score"])
        scores[("average", setting)].append(row["score"])
    tasks = sorted({task for task, _ in scores if task != "average"}) + ["average"]
    order = {"dense": 0}
    found = sorted({setting for _, setting in scores},
                   key=lambda s: (order.get(s[0], 1), s[0], s[1] or 0, s[2] or 0))
    return tasks, found, {k: (sum(v) / len(v), len(v)) for k, v in scores.items()}


def setting_of(row: dict) -> tuple[str, int | None, int | None]:
    """A row's setting: (method, with the other parameters it was run with, kv budget, prompt budget)."""
    given = row.get("params") or {}
    method = row["method"] + (f"({','.join(f'{k}={v}' for k, v in given.items())})" if given else "")
    return method, row["budget"], row["prompt_budget"]


def label(setting: tuple) -> str:
    method, budget, prompt_budget = setting
    parts = [f"kv {budget}" if budget is not None else "", f"prompt {prompt_budget}" if prompt_budget is not None else ""]
    return method + (f" ({', '.join(filter(None, parts))})" if any(parts) else "")


def warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def report(folder: Path, warn: Warn = warn_on_stderr) -> tuple[Path, Path, Path]:
    """Write summary.md, summary.csv and accuracy.png in `folder`; returns their paths."""
    rows = load_results([folder], warn)
    if not rows:
        raise ConfigError(f"{folder} has no finished results (results.jsonl is empty)")
    with writing(f"the report into {folder}", "results.jsonl is untouched; free space and run `draftkv eval "
                 "report` on the folder"):
        return write_report(folder, rows)


def write_report(folder: Path, rows: list[dict]) -> tuple[Path, Path, Path]:
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
    lines += guesses(rows)
    from .curve import curve_lines

    lines += curve_lines(rows, folder / "curve.png")
    (folder / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(table, found, folder / "accuracy.png", kept_counts(rows))
    return folder / "summary.md", folder / "summary.csv", folder / "accuracy.png"


def guesses(rows: list[dict]) -> list[str]:
    """A table of what the guesses that probed the cache were worth on their own: each guess (the draft's
    lookahead, or the target's pseudo-answer) scored with its sample's metric as if it were the answer,
    beside the score of the answer the target then gave. No lines when no row was probed by a guess."""
    probed = [row for row in rows if row.get("guess") is not None and row.get("metric") in metrics.SCORERS]
    if not probed:
        return []
    scores: dict[tuple[str, tuple], list[tuple[float, float]]] = defaultdict(list)
    for row in probed:
        guessed = metrics.SCORERS[row["metric"]](row["guess"], row["answers"])
        for task in (row["task"], "average"):
            scores[(task, setting_of(row))].append((guessed, row["score"]))
    tasks, settings, _ = summarize(probed)
    lines = ["", "## The guesses that probed the cache", "",
             "Each cell: the guess scored as if it were the answer / the score of the target's answer (n). A guess "
             "runs until it ends or reaches its length limit, and counts wherever in it the answer appears: on list "
             "tasks it can name more than was asked, and score above an answer.", "",
             "| setting | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for setting in settings:
        cells = [f"{statistics.fmean(g for g, _ in pairs):.1f} / {statistics.fmean(a for _, a in pairs):.1f} "
                 f"(n={len(pairs)})" if (pairs := scores.get((task, setting))) else "-" for task in tasks]
        lines.append(f"| {label(setting)} | " + " | ".join(cells) + " |")
    return lines


def kept_counts(rows: list[dict]) -> dict[tuple, float]:
    """Per setting whose budget is a ratio of the prompt: the mean count it kept (KV entries per head, or
    prompt tokens for a prompt budget), where the plot puts it on the budget axis."""
    kept: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        setting, stats = setting_of(row), row.get("stats") or {}
        if isinstance(row["budget"], float) and is_number(stats.get("kv_entries")):
            kept[setting].append(stats["kv_entries"])
        elif row["budget"] is None and isinstance(row["prompt_budget"], float) \
                and is_number(stats.get("kept_prompt_tokens")):
            kept[setting].append(stats["kept_prompt_tokens"])
    return {setting: sum(values) / len(values) for setting, values in kept.items()}


def plot(table: dict, found: list[tuple], path: Path, kept: dict[tuple, float] | None = None) -> None:
    """Average accuracy against budget, one line per method (dense as a horizontal reference). A ratio
    budget stands at the mean count it kept (`kept`), or is left out without one."""
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
            at = budget if budget is not None else prompt_budget
            if isinstance(at, float):
                if setting not in (kept or {}):
                    continue
                at = kept[setting]
            by_method[method if budget is None or prompt_budget is None else f"{method} (prompt {prompt_budget})"
                      ].append((at, mean))
    styles = line_styles(sorted(by_method))
    for method, points in sorted(by_method.items()):
        points.sort()
        axis.plot([p[0] for p in points], [p[1] for p in points], label=method, **styles[method])
    axis.set_xscale("log", base=2)
    save_scores(figure, axis, path, "budget (KV entries per head, or prompt tokens for prompt methods; a ratio at "
                                    "what it kept)")


# ---- several run folders: accuracy against length ----

PAIRS = [("speckv", "snapkv", "budget"), ("specpc", "specprefill", "prompt_budget")]  # the paper's comparisons
OURS = ("speckv", "specpc", "speckv-pc")  # the paper's methods, each held against dense


def by_length(folders: list[Path], out: Path, agreement: list[Path] | None = None,
              warn: Warn = warn_on_stderr) -> list[Path]:
    """The cross-length report of several run folders (one length each, or several): per setting its
    average at each length with n and its share of dense's, the SpecKV - SnapKV and SpecPC - SpecPrefill
    margins against length at equal budgets, the paper's methods against dense, per-task tables, a plot
    per absolute budget and a verdict on each comparison; with `agreement` folders (`draftkv analyze
    agreement` runs) also how well the draft's importance estimate matches the target's against length.
    Writes report.md, report.csv, accuracy_by_length.png, margins_by_length.png (and
    agreement_by_length.png) in `out`, and returns their paths."""
    agreement_rows = read_agreement(agreement or [])
    rows = load_results(folders, warn, needs_length=True)
    if not rows:
        raise ConfigError(f"no finished results in {', '.join(map(str, folders))}")
    with writing(f"the report into {out}", "the results folders are untouched"):
        return write_by_length(rows, agreement_rows, out)


def write_by_length(rows: list[dict], agreement_rows: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    scores: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        setting = setting_of(row)
        scores[(row["length"], "average", setting)].append(row["score"])
        scores[(row["length"], row["task"], setting)].append(row["score"])
    table = {key: (sum(values) / len(values), len(values)) for key, values in scores.items()}
    lengths = sorted({length for length, _, _ in table})
    tasks = sorted({task for _, task, _ in table if task != "average"})
    _, settings, _ = summarize(rows)

    def mean(length: int, setting: tuple, task: str = "average") -> float | None:
        return table[(length, task, setting)][0] if (length, task, setting) in table else None

    def cell(length: int, setting: tuple, task: str = "average") -> str:
        return f"{table[(length, task, setting)][0]:.1f} (n={table[(length, task, setting)][1]})" \
            if (length, task, setting) in table else "-"

    dense = ("dense", None, None)
    lines = ["## Average score by length", "",
             "| setting | " + " | ".join(f"{n:,}" for n in lengths) + " | " +
             " | ".join(f"of dense at {n:,}" for n in lengths) + " |",
             "|---|" + "---|" * (2 * len(lengths))]
    for setting in settings:
        shares = [f"{mean(n, setting) / mean(n, dense):.0%}" if mean(n, setting) is not None and mean(n, dense)
                  else "-" for n in lengths]
        lines.append(f"| {label(setting)} | " + " | ".join(cell(n, setting) for n in lengths) + " | "
                     + " | ".join(shares) + " |")
    verdicts, margins = [], []
    for better, baseline, kind in PAIRS:
        budgets = sorted({s[1] if kind == "budget" else s[2] for s in settings if s[0] == better} - {None})
        for budget in budgets:
            ours = (better, budget, None) if kind == "budget" else (better, None, budget)
            theirs = (baseline, budget, None) if kind == "budget" else (baseline, None, budget)
            points = [(n, found) for n in lengths if (found := paired_margin(rows, n, ours, theirs)) is not None]
            if not points:
                continue
            margins.append((f"{better} - {baseline} at {'KV' if kind == 'budget' else 'prompt'} {budget}", points))
            verdicts.append(verdict(better, baseline, kind, budget, points))
    lines += ["", "## Margins against length", "",
              "The mean score difference over the samples both settings ran, ± its standard error, and n.", "",
              *length_header("comparison", lengths)]
    lines += [estimates_row(name, points, lengths) for name, points in margins]
    lines += ["", "## Verdicts, as far as these lengths go", "", *[f"- {v}" for v in verdicts]]
    lines += against_dense(rows, settings, lengths)
    written = []
    if agreement_rows:
        lines += agreement_by_length(agreement_rows, out / "agreement_by_length.png")
        written.append(out / "agreement_by_length.png")
    for task in tasks:
        lines += ["", f"## {task}", "", *length_header("setting", lengths)]
        lines += [f"| {label(s)} | " + " | ".join(cell(n, s, task) for n in lengths) + " |" for s in settings]
    (out / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "report.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["length", "task", "method", "kv_budget", "prompt_budget", "score", "samples"])
        for (length, task, setting), (value, count) in sorted(table.items(), key=lambda item: str(item[0])):
            writer.writerow([length, task, *setting, f"{value:.2f}", count])
    plot_by_length(table, settings, lengths, out / "accuracy_by_length.png")
    plot_margins(margins, lengths, out / "margins_by_length.png")
    return [out / "report.md", out / "report.csv", out / "accuracy_by_length.png", out / "margins_by_length.png",
            *written]


@dataclass(frozen=True)
class Estimate:
    """A mean over samples at one length, its standard error and n: one setting's lead over another (a
    signed difference), or one measured share (unsigned)."""

    mean: float
    error: float | None  # None with one sample
    samples: int
    signed: bool = True

    @property
    def bar(self) -> float:
        """Half an error bar of about 95%: twice the standard error (none with one sample)."""
        return 2 * self.error if self.error is not None else 0.0

    @property
    def text(self) -> str:
        spread = f" ±{self.error:.1f}" if self.error is not None else ""
        return f"{self.mean:{'+' if self.signed else ''}.1f}{spread} (n={self.samples})"


def estimate(values: list[float], signed: bool = True) -> Estimate:
    """The mean of `values` with its standard error (none for a single value)."""
    error = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return Estimate(statistics.fmean(values), error, len(values), signed)


def paired_margin(rows: list[dict], length: int, ours: tuple, theirs: tuple) -> Estimate | None:
    """`ours` minus `theirs` at `length`, over the samples both ran (a partial run compares like with like)."""
    by_setting: dict[tuple, dict[str, float]] = {ours: {}, theirs: {}}
    for row in rows:
        setting = setting_of(row)
        if row["length"] == length and setting in by_setting:
            by_setting[setting][row["sample"]] = row["score"]
    differences = [by_setting[ours][s] - by_setting[theirs][s] for s in by_setting[ours] if s in by_setting[theirs]]
    return estimate(differences) if differences else None


def change_over_length(points: list[tuple[int, Estimate]]) -> tuple[float, float] | str:
    """The change from the shortest length to the longest and its noise (twice the standard error of the
    difference, about a 95% interval), or why there is no trend to call."""
    if len(points) < 2:
        return "one length, no trend yet"
    first, last = points[0][1], points[-1][1]
    if first.error is None or last.error is None:
        return "too few samples to call a trend"
    return last.mean - first.mean, 2 * math.hypot(first.error, last.error)


def verdict(better: str, baseline: str, kind: str, budget: int, points: list[tuple[int, Estimate]]) -> str:
    """Whether `better`'s lead over `baseline` holds, grows or shrinks from the shortest length to the longest.
    A change counts only past twice its standard error (about a 95% interval), so noise reads as 'holds'."""
    what = f"{better} over {baseline} at {'a KV budget' if kind == 'budget' else 'a prompt budget'} of {budget}"
    return f"{what}: {listed(points)}; {lead_trend(points)}"


def lead_trend(points: list[tuple[int, Estimate]]) -> str:
    """Whether a lead (one estimate minus another, per length) is there at the longest length, and whether it
    grows, shrinks or holds."""
    reason = change_over_length(points)
    if isinstance(reason, str):
        return reason
    first, last = points[0][1], points[-1][1]
    if last.mean <= 2 * last.error:
        return "the lead is gone at the longest length" if first.mean > 2 * first.error else "no clear lead at these lengths"
    return f"the lead {trend(points, 'grows', 'shrinks')}"


def trend(points: list[tuple[int, Estimate]], up: str = "rises", down: str = "falls") -> str:
    """`up`, `down` or 'holds' from the shortest length to the longest, against its noise."""
    found = change_over_length(points)
    if isinstance(found, str):
        return found
    change, noise = found
    if change > noise:
        return f"{up} with length ({change:+.1f}, beyond the noise of ±{noise:.1f})"
    if change < -noise:
        return f"{down} with length ({change:+.1f}, beyond the noise of ±{noise:.1f})"
    return f"holds ({change:+.1f}, within the noise of ±{noise:.1f})"


def listed(points: list[tuple[int, Estimate]]) -> str:
    return ", ".join(f"{value.text} at {n:,}" for n, value in points)


def length_header(first: str, lengths: list[int]) -> list[str]:
    """The header of a table with one column per length."""
    return [f"| {first} | " + " | ".join(f"{n:,}" for n in lengths) + " |", "|---|" + "---|" * len(lengths)]


def estimates_row(name: str, points: list[tuple[int, Estimate]], lengths: list[int]) -> str:
    found = dict(points)
    return f"| {name} | " + " | ".join(found[n].text if n in found else "-" for n in lengths) + " |"


def against_dense(rows: list[dict], settings: list[tuple], lengths: list[int]) -> list[str]:
    """The paper's methods (SpecKV, SpecPC, SpecKV-PC) minus dense at each length, paired over samples, and
    whether that difference holds as the prompt grows: the paper's claim of near-dense accuracy."""
    dense = ("dense", None, None)
    table, verdicts = [], []
    for setting in settings:
        if setting[0] not in OURS:
            continue
        points = [(n, found) for n in lengths if (found := paired_margin(rows, n, setting, dense)) is not None]
        if not points:
            continue
        table.append(estimates_row(label(setting), points, lengths))
        last, reason = points[-1][1], change_over_length(points)
        if isinstance(reason, str):
            words = reason
        elif abs(last.mean) <= 2 * last.error:
            words = "level with dense at the longest length, within the noise"
        else:
            words = f"its difference from dense {trend(points)}"
        verdicts.append(f"- {label(setting)} against dense: {listed(points)}; {words}")
    if not table:
        return []
    return ["", "## The paper's methods against dense", "",
            "Each setting's score minus dense's, paired over the samples both ran, ± its standard error.", "",
            *length_header("setting", lengths), *table, "", *verdicts]


AGREEMENT = {"speckv_spearman": "SpecKV rank correlation", "snapkv_spearman": "SnapKV rank correlation",
             "speckv_recall": "SpecKV top-C recall", "snapkv_recall": "SnapKV top-C recall"}  # `analyze agreement` rows


def read_agreement(folders: list[Path]) -> list[dict]:
    """The rows of `draftkv analyze agreement` folders, checked before any report is written."""
    rows = []
    for folder in folders:
        found = read_rows(folder / "rows.jsonl")
        if not found:
            raise ConfigError(f"{folder} has no agreement rows: rows.jsonl, written by `draftkv analyze agreement`, "
                              "is missing or empty")
        if any("length" not in row or not set(AGREEMENT) <= row.keys() for row in found):
            raise ConfigError(f"{folder / 'rows.jsonl'} is not from `draftkv analyze agreement` (its rows lack a "
                              f"length or one of {', '.join(AGREEMENT)})")
        rows += found
    return rows


def agreement_by_length(rows: list[dict], path: Path) -> list[str]:
    """How closely the draft's (SpecKV) and the window's (SnapKV) importance estimates match the oracle's
    at each length, in percent: the mean over layers and KV heads of each sample, then over samples."""
    per_sample: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for row in rows:
        per_sample[(row["length"], row["sample"])].append(row)
    lengths = sorted({length for length, _ in per_sample})

    means = {key: {metric: 100 * statistics.fmean(r[metric] for r in layers) for metric in AGREEMENT}
             for key, layers in per_sample.items()}  # per (length, sample): the mean over layers, in %
    at = {n: [sample for (length, _), sample in means.items() if length == n] for n in lengths}
    points = {metric: [(n, estimate([sample[metric] for sample in at[n]], signed=False)) for n in lengths]
              for metric in AGREEMENT}
    # The draft's lead over the window, paired per sample: does its advantage hold as the prompt grows?
    leads = {kind: [(n, estimate([sample[f"speckv_{kind}"] - sample[f"snapkv_{kind}"] for sample in at[n]]))
                    for n in lengths] for kind in ("spearman", "recall")}
    lines = ["", "## Does the draft see what the target sees? Against length", "",
             "Agreement with the oracle importance (the target's own answer as lookahead), in %: the mean over "
             "layers and KV heads of each sample, ± the standard error over samples.", "",
             "| length | " + " | ".join(AGREEMENT.values()) + " |", "|---|" + "---|" * len(AGREEMENT)]
    lines += [f"| {n:,} | " + " | ".join(dict(points[m])[n].text for m in AGREEMENT) + " |" for n in lengths]
    lines += [""] + [f"- {name}: {listed(points[m])}; {trend(points[m])}" for m, name in AGREEMENT.items()]
    lead_names = {"spearman": "rank correlation", "recall": "top-C recall"}
    lines += ["", "SpecKV minus SnapKV, paired over each sample's two estimates, in points:", "",
              *length_header("SpecKV's lead in", lengths),
              *(estimates_row(name, leads[kind], lengths) for kind, name in lead_names.items()), ""]
    lines += [f"- SpecKV's lead over SnapKV in {name}: {listed(leads[kind])}; {lead_trend(leads[kind])}"
              for kind, name in lead_names.items()]
    plot_agreement(points, lengths, path)
    return lines


def plot_agreement(points: dict[str, list[tuple[int, Estimate]]], lengths: list[int], path: Path) -> None:
    """Rank correlation and top-C recall against length, SpecKV beside SnapKV, bars of two standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    styles = line_styles(["SpecKV (draft lookahead)", "SnapKV (window only)"])
    for axis, kind, title in zip(axes, ("spearman", "recall"), ("rank correlation with the oracle",
                                                                  "recall of the oracle's top-C"), strict=True):
        for method, name in (("speckv", "SpecKV (draft lookahead)"), ("snapkv", "SnapKV (window only)")):
            found = points[f"{method}_{kind}"]
            axis.errorbar([n for n, _ in found], [e.mean for _, e in found],
                          yerr=[e.bar for _, e in found], capsize=4, label=name,
                          **styles[name])
        length_axis(axis, lengths, "% (bars: ±2 standard errors)")
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_by_length(table: dict, settings: list[tuple], lengths: list[int], path: Path) -> None:
    """Average score against length, one panel per absolute budget, one line per method (dense in each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(s[1], s[2]) for s in settings if s[0] != "dense"},
                    key=lambda b: (b[0] is None, b[0] or 0, b[1] or 0))
    columns = min(max(len(panels), 1), 3)
    rows = max(math.ceil(len(panels) / columns), 1)
    # One score scale in every panel, so a panel with one method does not magnify a small change.
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4 * rows), squeeze=False, sharey=True)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    styles = line_styles(sorted({s[0] for s in settings}))
    for axis, budgets in zip(axes.flat, panels, strict=False):
        for setting in [("dense", None, None), *[s for s in settings if (s[1], s[2]) == budgets]]:
            points = [(n, table[(n, "average", setting)][0]) for n in lengths if (n, "average", setting) in table]
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], label=setting[0], **styles[setting[0]])
        kv, prompt = budgets
        axis.set_title(" + ".join(filter(None, [f"KV {kv}" if kv else "", f"prompt {prompt}" if prompt else ""])))
        length_axis(axis, lengths, "average score")
        axis.set_ylim(0, 102)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_margins(margins: list[tuple[str, list[tuple[int, Estimate]]]], lengths: list[int], path: Path) -> None:
    """Each comparison's margin against length, with bars of twice its standard error (about 95%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    styles = line_styles([name for name, _ in margins])
    for index, (name, points) in enumerate(margins):
        dodge = 2 ** (0.04 * (index - (len(margins) - 1) / 2))  # side by side, so the bars do not hide each other
        axis.errorbar([n * dodge for n, _ in points], [m.mean for _, m in points],
                      yerr=[m.bar for _, m in points], capsize=4, label=name,
                      **styles[name])
    axis.axhline(0, color="black", linewidth=0.8)
    length_axis(axis, lengths, "score difference (bars: ±2 standard errors)")
    axis.set_title("margins against length, at equal budget")
    if margins:
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def length_axis(axis, lengths: list[int], ylabel: str) -> None:
    """Prompt length on a log-2 x axis, ticked at the lengths that ran."""
    axis.set_xscale("log", base=2)
    axis.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
    axis.set_xlabel("prompt length (tokens)")
    axis.set_ylabel(ylabel)
