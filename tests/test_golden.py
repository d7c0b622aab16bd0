"""Golden outputs of the request flow, recorded before the executor redesign and kept identical after it.

Every method x {tiny qwen2, tiny llama} x {one request; a 2-row batch of different lengths; the eval
runner's shared set of all methods on one sample; query-agnostic `compress_context(...).ask`}: token
ids, kept KV positions, kept prompt tokens, every `Stats` field but times and memory, the set of
timing keys, and forward calls per model. The draft has 9 layers so every method runs with its
defaults (SpecPC's first scoring layer is 8).

Record again only when a change of behaviour is meant, and say why in the commit:
    DRAFTKV_GOLDEN=record python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tiny import long_context, make_model, make_tokenizer

import draftkv
from draftkv.eval import ruler, runner
from draftkv.models import pair_from_models
from draftkv.types import Request

GOLDEN = Path(__file__).parent / "golden" / "flow.json"
RECORD = os.environ.get("DRAFTKV_GOLDEN") == "record"
KV_BUDGET, PROMPT_BUDGET, NEW_TOKENS = 48, 120, 6
METHODS = list(draftkv.METHODS)
UNTIMED = ("time_to_first_token", "total_time", "peak_memory_bytes")


def golden_pair(family: str):
    tokenizer = make_tokenizer()
    target = make_model(family, layers=3, seed=0)
    draft = make_model(family, layers=9, hidden=32, seed=1)
    return pair_from_models(target, tokenizer, draft, tokenizer)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def family_pair(request):
    return request.param, golden_pair(request.param)


def budgets(method: str) -> dict:
    return runner.Setting(method, *_budget_pair(method)).params


def _budget_pair(method: str) -> tuple[int | None, int | None]:
    takes_kv, takes_prompt = draftkv.methods.budget_kinds(method)
    return (KV_BUDGET if takes_kv else None), (PROMPT_BUDGET if takes_prompt else None)


class ForwardCalls:
    """Counts forward calls per model (a pre-hook on each)."""

    def __init__(self, pair) -> None:
        self.models = {"target": pair.target.model, "draft": pair.draft.model}
        self.counts = dict.fromkeys(self.models, 0)
        self.hooks = []

    def __enter__(self) -> dict:
        for role, model in self.models.items():
            self.hooks.append(model.register_forward_pre_hook(lambda *_a, role=role: self._count(role)))
        return self.counts

    def _count(self, role: str) -> None:
        self.counts[role] += 1

    def __exit__(self, *_exc) -> None:
        for hook in self.hooks:
            hook.remove()


def stats_record(stats) -> dict:
    record = {k: v for k, v in stats.to_dict().items() if k not in UNTIMED}
    record["timings"] = sorted(record["timings"])
    return record


def result_record(result) -> dict:
    return {
        "text": result.text, "token_ids": result.token_ids, "finish_reason": result.finish_reason,
        "stats": stats_record(result.stats),
        "kept_positions": None if result.kept_positions is None else [p.tolist() for p in result.kept_positions],
        "kept_tokens": None if result.kept_tokens is None else result.kept_tokens.tolist(),
    }


def outcome(run) -> dict:
    """What a call gives: its record, or the error a user sees."""
    try:
        return {"ok": run()}
    except draftkv.DraftKVError as error:
        return {"error": f"{type(error).__name__}: {error}"}


REQUESTS = [
    Request(context=long_context(230, seed=41), question="what is the magic number?", max_new_tokens=NEW_TOKENS),
    Request(context=long_context(170, seed=42), question="when is the launch?", max_new_tokens=NEW_TOKENS),
]


def one_request(pair, method: str) -> dict:
    request = REQUESTS[0]
    with ForwardCalls(pair) as calls:
        got = outcome(lambda: result_record(draftkv.generate(
            pair, request.context, request.question, method=method, max_new_tokens=NEW_TOKENS, **budgets(method))))
    return {**got, "forward_calls": dict(calls)}


def two_row_batch(pair, method: str) -> dict:
    with ForwardCalls(pair) as calls:
        got = outcome(lambda: [result_record(r) for r in draftkv.generate_batch(pair, REQUESTS, method, **budgets(method))])
    return {**got, "forward_calls": dict(calls)}


def query_agnostic(pair, method: str) -> dict:
    def run() -> dict:
        compressed = draftkv.compress_context(pair, REQUESTS[0].context, method=method, max_new_tokens=NEW_TOKENS,
                                              **budgets(method))
        answers = [result_record(compressed.ask(r.question, max_new_tokens=NEW_TOKENS)) for r in REQUESTS]
        return {"compressed": stats_record(compressed.stats), "answers": answers}

    with ForwardCalls(pair) as calls:
        got = outcome(run)
    return {**got, "forward_calls": dict(calls)}


def runner_shared_set(pair, out: Path) -> dict:
    sample = ruler.generate("niah_single_1", 300, make_tokenizer(), samples=1, seed=3)[0]
    settings = runner.settings(METHODS, [KV_BUDGET], [PROMPT_BUDGET])
    with ForwardCalls(pair) as calls:
        path = runner.run(pair, [sample], settings, out, {"golden": True})
    rows = {row["key"]: {"prediction": row["prediction"], "score": row["score"], "stats": stats_record_dict(row["stats"])}
            for row in runner.read_rows(path)}
    return {"rows": rows, "forward_calls": dict(calls)}


def stats_record_dict(stats: dict) -> dict:
    record = {k: v for k, v in stats.items() if k not in UNTIMED}
    record["timings"] = sorted(record["timings"])
    return record


def record_family(pair, tmp_path: Path) -> dict:
    return {
        "one_request": {m: one_request(pair, m) for m in METHODS},
        "two_row_batch": {m: two_row_batch(pair, m) for m in METHODS},
        "query_agnostic": {m: query_agnostic(pair, m) for m in METHODS},
        "runner_shared_set": runner_shared_set(pair, tmp_path / "runner"),
    }


def normalised(value):
    """JSON's view of a record (tuples become lists), so recorded and fresh records compare alike."""
    return json.loads(json.dumps(value))


def test_the_flow_gives_its_golden_outputs(family_pair, tmp_path):
    family, pair = family_pair
    with torch.inference_mode():
        fresh = normalised(record_family(pair, tmp_path))
    if RECORD:
        recorded = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        recorded[family] = fresh
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())[family]
    for case in expected:
        if case == "runner_shared_set":
            assert fresh[case] == expected[case], case
            continue
        for method in expected[case]:
            assert fresh[case][method] == expected[case][method], f"{family} {case} {method}"
