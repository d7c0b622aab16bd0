"""Query-agnostic compression and multi-question reuse of one compressed cache."""

from __future__ import annotations

import pytest
import torch
from tiny import long_context

from draftkv.context import compress_context
from draftkv.errors import PromptError

CONTEXT = long_context(280, seed=11)
QUESTIONS = ["what is the magic number?", "who is on monday?", "where is the launch?"]
METHODS = [("snapkv", {"budget": 64, "window": 8}), ("speckv", {"budget": 64, "window": 8}),
           ("h2o", {"budget": 64, "window": 8}), ("streamingllm", {"budget": 64}),
           ("specpc", {"budget": 120, "window": 16, "kernel": 7, "neighbourhood": 8, "start_layer": 0}),
           ("dense", {})]


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_reuse_equals_compressing_per_question(qwen_pair, method, params):
    shared = compress_context(qwen_pair, CONTEXT, method=method, max_new_tokens=8, **params)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in shared.prepared.cache.layers]
    reused = [shared.ask(q, max_new_tokens=8).token_ids for q in QUESTIONS]
    for (keys, values), layer in zip(before, shared.prepared.cache.layers, strict=True):
        assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)  # each answer was removed
    fresh = [compress_context(qwen_pair, CONTEXT, method=method, max_new_tokens=8, **params).ask(q, max_new_tokens=8)
             .token_ids for q in QUESTIONS]
    assert reused == fresh
    assert len({tuple(ids) for ids in reused}) > 1  # the questions do matter


def test_the_window_holds_the_end_of_the_context_not_the_question(qwen_pair):
    shared = compress_context(qwen_pair, CONTEXT, method="snapkv", budget=64, window=8)
    n = shared.context_tokens
    assert shared.stats.kv_entries == 64 and shared.stats.compressed
    for layer in shared.prepared.kept_rows[0]:
        for head in layer.tolist():
            assert set(range(n - 8, n)) <= set(head) and max(head) < n
    answer = shared.ask(QUESTIONS[0], max_new_tokens=4)
    assert answer.stats.prompt_tokens > n and "query-agnostic" in answer.stats.note


def test_bad_input(qwen_pair):
    with pytest.raises(PromptError, match="context is empty"):
        compress_context(qwen_pair, "  ", method="snapkv", budget=64)
    shared = compress_context(qwen_pair, CONTEXT, method="snapkv", budget=64, window=8)
    with pytest.raises(PromptError, match="question is empty"):
        shared.ask("")
