"""The evaluation runner: samples x methods x budgets, resumable and crash-safe.

Every finished (sample, method, budget) is one JSON line appended to `results.jsonl` and flushed to
disk before the next starts, so a killed run loses at most the one in flight and never leaves a
corrupt file (a torn last line is ignored on reading). A rerun of the same command skips every
finished line; a second run into a folder another run is writing to is refused. The config goes to
`config.json`: the last command's, with the settings of every command that wrote to the folder.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError
from ..jsonl import append_row, drop_torn_tail, exclusive, read_rows, writing
from ..methods import (
    Budget,
    Method,
    budget_kinds,
    budget_params,
    budget_settings,
    method_spec,
    method_with_budgets,
)
from ..progress import progress_bar
from ..types import is_int
from . import metrics
from .ruler import Sample

if TYPE_CHECKING:
    from ..models import ModelPair
    from ..types import Result


def score(sample: Sample, prediction: str) -> float:
    if sample.metric == "classification":
        return metrics.classification(prediction, sample.answers, sample.classes)
    return metrics.SCORERS[sample.metric](prediction, sample.answers)


@dataclass(frozen=True)
class Setting:
    """One method at one budget (prompt budget for prompt methods; both for speckv-pc)."""

    method: str
    budget: Budget | None = None
    prompt_budget: Budget | None = None
    given: tuple[tuple[str, Any], ...] = ()  # its other parameters (`name:key=value` on the command line)

    @property
    def params(self) -> dict:
        return {**dict(self.given), **budget_params(self.method, self.budget, self.prompt_budget)}

    def make(self) -> Method:
        return method_with_budgets(self.method, self.budget, self.prompt_budget, **dict(self.given))

    @property
    def label(self) -> str:
        given = ",".join(f"{key}={value}" for key, value in self.given)
        parts = [f"kv={self.budget}" if self.budget is not None else "", f"prompt={self.prompt_budget}"
                 if self.prompt_budget is not None else ""]
        return " ".join([f"{self.method}({given})" if given else self.method, *filter(None, parts)])


def settings(methods: list[str], budgets: list[Budget], prompt_budgets: list[Budget]) -> list[Setting]:
    """Each method with the budgets that apply to it: KV budgets, prompt budgets, or both.

    A method written `name@BUDGET` (`speckv-pc@KV/PROMPT`) runs at that budget only, not at the lists';
    `name:key=value@BUDGET` also sets its other parameters (`speckv:verify_lookahead=false`)."""
    result = []
    for text in methods:
        spec, _, pinned = text.partition("@")
        name, given = method_spec(spec)
        given = tuple(sorted(given.items()))
        if pinned:
            result.append(dataclasses.replace(_pinned(f"{name}@{pinned}"), given=given))
            continue
        result += [Setting(name, b, p, given) for b, p in budget_settings(name, budgets, prompt_budgets)]
    if not result:
        raise ConfigError("nothing to run: give methods and the budgets that apply to them")
    for setting in result:
        setting.make()  # a budget the method refuses (0, a ratio above 1) fails before any model loads
    if len(set(result)) < len(result):
        repeated = sorted({s.label for s in result if result.count(s) > 1})
        raise ConfigError(f"setting(s) named twice: {', '.join(repeated)}; name each method and budget once")
    return result


def _pinned(text: str) -> Setting:
    """`name@BUDGET` (a KV or a prompt method) or `name@KV/PROMPT` (speckv-pc) as one setting; each budget a
    count (256) or a ratio (0.25; speckv-pc's KV ratio is a share of the prompt it kept)."""
    name, _, given = text.partition("@")
    takes_kv, takes_prompt = budget_kinds(name)
    wanted = ("KV/PROMPT" if takes_kv and takes_prompt else "KV" if takes_kv else "PROMPT" if takes_prompt else "")
    if not wanted:
        raise ConfigError(f"{text!r}: method {name!r} takes no budget, so write it without '@'")
    values = [_pinned_budget(part) for part in given.split("/")]
    if len(values) != wanted.count("/") + 1 or None in values:
        raise ConfigError(f"{text!r}: write {name}@{wanted} with counts (whole numbers >= 1) or ratios in (0, 1], "
                          f"e.g. {name}@{'256/1024' if '/' in wanted else 256} or {name}@{'0.5/0.5' if '/' in wanted else 0.25}")
    if takes_kv and takes_prompt:
        if is_int(values[0]) and is_int(values[1]) and values[0] > values[1]:
            raise ConfigError(f"{text!r}: the KV budget {values[0]} is above the prompt budget {values[1]}; "
                              "the KV stage keeps entries of the kept prompt, so give KV <= PROMPT")
        return Setting(name, values[0], values[1])
    return Setting(name, values[0]) if takes_kv else Setting(name, None, values[0])


def _pinned_budget(text: str) -> Budget | None:
    """A count (a whole number >= 1) or a ratio in (0, 1], or None when `text` is neither."""
    try:
        value = float(text) if "." in text else int(text)
    except ValueError:
        return None
    return value if (is_int(value) and value >= 1) or (isinstance(value, float) and 0 < value <= 1) else None


def key(sample_id: str, setting: Setting) -> str:
    return f"{sample_id}|{setting.label}"


def run(pair: ModelPair, samples: Iterable[Sample], runs: list[Setting], out: Path, config: dict,
        share: bool = True, query_agnostic: bool = False, batch_settings: bool = True) -> Path:
    """Run every setting on every sample, appending to `out/results.jsonl`; returns its path.

    With `share`, every setting of a sample runs through the executor together: one draft pass for
    all that use the draft, one target prefill for dense and the KV methods (exactly what separate
    runs give). With `query_agnostic`, the context is compressed before the question is known and the
    question is asked afterwards. A row's `seconds` is the wall time since the sample's previous row
    (its first row carries the shared stages)."""
    with writing(f"the results to {out}", "the rows already written are kept, and the same command resumes "
                 "after them"), exclusive(out):
        return _run(pair, samples, runs, out, config, share, query_agnostic, batch_settings)


def _run(pair: ModelPair, samples: Iterable[Sample], runs: list[Setting], out: Path, config: dict,
         share: bool, query_agnostic: bool, batch_settings: bool) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    from ..models.dtypes import dtype_name

    config = {**config, "share": share, "query_agnostic": query_agnostic,
              "batch_settings": share and batch_settings and not query_agnostic}
    if pair is not None:  # what the rows were computed in: results of two dtypes are not mixed unchecked
        config["dtype"] = dtype_name(pair.target.model.dtype)
    config_path = out / "config.json"
    if "settings" in config and config_path.is_file():  # a later command into the folder adds its settings
        try:
            earlier = json.loads(config_path.read_text(encoding="utf-8")).get("settings", [])
        except (json.JSONDecodeError, AttributeError):
            earlier = []
        config["settings"] = [*earlier, *(label for label in config["settings"] if label not in earlier)]
    config_path.write_text(json.dumps(config, indent=1, sort_keys=True), encoding="utf-8")
    path = out / "results.jsonl"
    drop_torn_tail(path)
    done = {row.get("key") for row in read_rows(path)}
    todo = [(sample, [s for s in runs if key(sample.id, s) not in done]) for sample in samples]
    todo = [(sample, missing) for sample, missing in todo if missing]
    # One step a sample: its settings finish together when they decode as one batch.
    with open(path, "a", encoding="utf-8") as handle, progress_bar() as progress:
        task = progress.add_task(f"samples ({len(done)} rows done before)", total=len(todo))
        for sample, missing in todo:
            progress.update(task, description=f"samples: {sample.id} ({len(missing)} settings)")
            last = time.perf_counter()
            for setting, result in sample_results(pair, sample, missing, share, query_agnostic,
                                                  config["batch_settings"]):
                now = time.perf_counter()
                append_row(handle, row(sample, setting, result, now - last))
                last = now
            progress.advance(task)
    return path


def sample_results(pair: ModelPair, sample: Sample, settings: list[Setting], share: bool,
                   query_agnostic: bool, batch_settings: bool = False) -> Iterator[tuple[Setting, Result]]:
    """Each setting's result on one sample, as each finishes."""
    from ..context import compress_context_each
    from ..flow import run_each

    methods = [s.make() for s in settings]
    groups = [list(range(len(settings)))] if share else [[i] for i in range(len(settings))]
    if query_agnostic:
        for group in groups:
            for index, compressed in compress_context_each(pair, sample.context, [methods[i] for i in group],
                                                           max_new_tokens=sample.max_new_tokens):
                yield settings[group[index]], compressed.ask(sample.question, answer_prefix=sample.answer_prefix,
                                                             max_new_tokens=sample.max_new_tokens)
        return
    for group in groups:
        for index, results in run_each(pair, [sample.request()], [methods[i] for i in group],
                                       decode_together=batch_settings and len(group) > 1):
            yield settings[group[index]], results[0]


def row(sample: Sample, setting: Setting, result, seconds: float) -> dict:
    return {
        "key": key(sample.id, setting), "sample": sample.id, "task": sample.task, "length": sample.length,
        "method": setting.method, "budget": setting.budget, "prompt_budget": setting.prompt_budget,
        **({"params": dict(setting.given)} if setting.given else {}),
        "prediction": result.text, "answers": sample.answers, "metric": sample.metric,
        "score": score(sample, result.text), "seconds": seconds, "guess": result.guess,
        "stats": result.stats.to_dict(),
    }
