"""The evaluation runner: samples x methods x budgets, resumable and crash-safe.

Every finished (sample, method, budget) is one JSON line appended to `results.jsonl` and flushed to
disk before the next starts, so a killed run loses at most the one in flight and never leaves a
corrupt file (a torn last line is ignored on reading). A rerun of the same command skips every
finished line. The exact config goes to `config.json`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..context import compress_context
from ..errors import ConfigError
from ..jsonl import append_row, drop_torn_tail, read_rows
from ..methods import Method, PromptMethod, SpecKVPC, budget_kinds, get_method
from ..pipeline import Drafted, generate_batch, generate_shared, shared_draft
from ..progress import progress_bar
from . import metrics
from .ruler import Sample

if TYPE_CHECKING:
    from ..models import ModelPair

SCORERS = {"all": metrics.ruler_all, "part": metrics.ruler_part, "qa_f1": metrics.qa_f1, "rouge_l": metrics.rouge_l,
           "code_similarity": metrics.code_similarity, "count_score": metrics.count_score,
           "retrieval_score": metrics.retrieval_score}


def score(sample: Sample, prediction: str) -> float:
    if sample.metric == "classification":
        return metrics.classification(prediction, sample.answers, sample.classes)
    return SCORERS[sample.metric](prediction, sample.answers)


@dataclass(frozen=True)
class Setting:
    """One method at one budget (prompt budget for prompt methods; both for speckv-pc)."""

    method: str
    budget: int | None = None
    prompt_budget: int | None = None

    @property
    def params(self) -> dict:
        params = {"budget": self.budget} if self.budget is not None else {}
        if self.prompt_budget is not None:
            params["prompt_budget" if self.budget is not None else "budget"] = self.prompt_budget
        return params

    @property
    def label(self) -> str:
        parts = [f"kv={self.budget}" if self.budget is not None else "", f"prompt={self.prompt_budget}"
                 if self.prompt_budget is not None else ""]
        return " ".join([self.method, *filter(None, parts)])


def settings(methods: list[str], budgets: list[int], prompt_budgets: list[int]) -> list[Setting]:
    """Each method with the budgets that apply to it: KV budgets, prompt budgets, or both."""
    result = []
    for name in methods:
        takes_kv, takes_prompt = budget_kinds(name)  # fails fast on an unknown name
        if takes_kv and takes_prompt:
            result += [Setting(name, b, p) for p in prompt_budgets for b in budgets if b <= p]
        elif takes_kv:
            result += [Setting(name, b) for b in budgets]
        elif takes_prompt:
            result += [Setting(name, None, p) for p in prompt_budgets]
        else:
            result.append(Setting(name))
    if not result:
        raise ConfigError("nothing to run: give methods and the budgets that apply to them")
    return result


def key(sample_id: str, setting: Setting) -> str:
    return f"{sample_id}|{setting.label}"


def shareable(method: Method) -> bool:
    """Dense and KV methods read the whole prompt, so they can share one prefill (prompt methods cannot)."""
    return not isinstance(method, PromptMethod | SpecKVPC)


def run(pair: ModelPair, samples: Iterable[Sample], runs: list[Setting], out: Path, config: dict,
        share: bool = True, query_agnostic: bool = False) -> Path:
    """Run every setting on every sample, appending to `out/results.jsonl`; returns its path.

    With `share`, every setting of a sample that uses the draft reads one draft pass, and the dense
    and KV settings run from one target prefill (exactly what separate runs give; see
    pipeline.shared_draft and pipeline.generate_shared). With `query_agnostic`, the
    context is compressed before the question is known and the question is asked afterwards."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**config, "share": share, "query_agnostic": query_agnostic},
                                                indent=1, sort_keys=True), encoding="utf-8")
    path = out / "results.jsonl"
    drop_torn_tail(path)
    done = {row["key"] for row in read_rows(path)}
    todo = [(sample, [s for s in runs if key(sample.id, s) not in done]) for sample in samples]
    todo = [(sample, missing) for sample, missing in todo if missing]
    with open(path, "a", encoding="utf-8") as handle, progress_bar() as progress:
        task = progress.add_task(f"{len(done)} done before", total=sum(len(missing) for _, missing in todo))
        for sample, missing in todo:
            request = sample.request()
            methods = {s: get_method(s.method, **s.params) for s in missing}
            together = [s for s in missing if share and shareable(methods[s])] if len(missing) > 1 and not query_agnostic else []
            groups = ([together] if together else []) + [[s] for s in missing if s not in together]
            started = time.perf_counter()
            # One draft pass for every setting of this sample that asks the draft for something.
            drafts = shared_draft(pair, request, list(methods.values())) if share and not query_agnostic else None
            drafted = dict(zip(missing, drafts, strict=True)) if drafts is not None else {}
            shared_seconds = (time.perf_counter() - started) / len(missing)
            for group in groups:
                progress.update(task, description=f"{sample.task} {', '.join(s.label for s in group)}")
                started = time.perf_counter()
                if query_agnostic:
                    compressed = compress_context(pair, sample.context, method=group[0].method,
                                                  max_new_tokens=sample.max_new_tokens, **group[0].params)
                    results = [compressed.ask(sample.question, answer_prefix=sample.answer_prefix,
                                              max_new_tokens=sample.max_new_tokens)]
                elif len(group) > 1:
                    results = generate_shared(pair, request, [methods[s] for s in group],
                                              drafted=longest([drafted[s] for s in group if s in drafted]))
                else:
                    results = generate_batch(pair, [request], methods[group[0]], drafted=drafted.get(group[0]))
                seconds = (time.perf_counter() - started) / len(group) + shared_seconds
                for setting, result in zip(group, results, strict=True):
                    append_row(handle, row(sample, setting, result, seconds))
                progress.advance(task, len(group))
    return path


def longest(drafts: list[Drafted]) -> Drafted | None:
    """The view with the longest lookahead: the others' are its first tokens."""
    drafted = [d for d in drafts if d.view is not None]
    return max(drafted, key=lambda d: d.view.lookahead_ids.shape[1]) if drafted else None


def row(sample: Sample, setting: Setting, result, seconds: float) -> dict:
    return {
        "key": key(sample.id, setting), "sample": sample.id, "task": sample.task, "length": sample.length,
        "method": setting.method, "budget": setting.budget, "prompt_budget": setting.prompt_budget,
        "prediction": result.text, "answers": sample.answers, "metric": sample.metric,
        "score": score(sample, result.text), "seconds": seconds,
        "stats": result.stats.to_dict(),
    }
