"""Query-agnostic compression and multi-question reuse of one compressed cache."""

from __future__ import annotations

import re

import pytest
import torch
from tiny import long_context

from draftkv.context import compress_context
from draftkv.errors import ConfigError, PromptError

CONTEXT = long_context(280, seed=11)
QUESTIONS = ["what is the magic number?", "who is on monday?", "where is the launch?"]
METHODS = [("snapkv", {"budget": 64, "window": 8}), ("speckv", {"budget": 64, "window": 8}),
           ("h2o", {"budget": 64, "window": 8}), ("streamingllm", {"budget": 64}),
           ("specpc", {"budget": 120, "window": 16, "kernel": 7, "neighbourhood": 8, "start_layer": 0}),
           ("pyramidkv", {"budget": 64, "window": 8}), ("ada-snapkv", {"budget": 64, "window": 8}),
           ("ada-speckv", {"budget": 64, "window": 8, "layout": "per-head"}), ("dense", {})]


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_reuse_equals_compressing_per_question(qwen_pair, method, params):
    shared = compress_context(qwen_pair, CONTEXT, method=method, max_new_tokens=8, **params)
    before = [(layer.keys.clone(), layer.values.clone()) if layer.keys is not None else (None, None)
              for layer in shared.prepared.cache.layers]
    length_before = shared.prepared.cache.get_seq_length()
    reused = [shared.ask(q, max_new_tokens=8).token_ids for q in QUESTIONS]
    for (keys, values), layer in zip(before, shared.prepared.cache.layers, strict=True):
        if keys is not None:  # (per-head ragged layers keep no padded tensors between steps)
            assert torch.equal(keys, layer.keys) and torch.equal(values, layer.values)  # each answer was removed
    assert shared.prepared.cache.get_seq_length() == length_before
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
    for given, words in [({"max_new_tokens": 0}, "max_new_tokens must be an int >= 1"),
                         ({"max_new_tokens": -3}, "max_new_tokens must be an int >= 1"),
                         ({"max_new_tokens": "4"}, "max_new_tokens must be an int >= 1, got '4'"),
                         ({"stop": [5]}, "stop must be a string or a list of strings"),
                         ({"temperature": "hot"}, "temperature must be a number"),
                         ({"seed": 2**70}, "seed must be an int"),
                         ({"on_text": "print"}, "on_text must be a function")]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            shared.ask(QUESTIONS[0], **given)


def test_ask_honours_stop_strings_and_sampling_as_generate_does(qwen_pair):
    shared = compress_context(qwen_pair, CONTEXT, method="snapkv", budget=64, window=8, max_new_tokens=12)
    whole = shared.ask(QUESTIONS[0], max_new_tokens=12)
    cut = whole.text[3:6]  # a stop string of several characters, met inside the answer
    stopped = shared.ask(QUESTIONS[0], max_new_tokens=12, stop=cut)
    assert stopped.finish_reason == "stop" and stopped.text == whole.text[:whole.text.index(cut)]
    first, again = (shared.ask(QUESTIONS[0], max_new_tokens=12, temperature=1.5, seed=3) for _ in range(2))
    other = shared.ask(QUESTIONS[0], max_new_tokens=12, temperature=1.5, seed=4)
    assert first.token_ids == again.token_ids and len({tuple(first.token_ids), tuple(other.token_ids),
                                                       tuple(whole.token_ids)}) > 1


def test_both_ragged_layouts_answer_alike(qwen_pair):
    """Reading a multi-token question over a ragged cache masks each head causally, in either layout."""
    answers = {}
    for layout in ("padded", "per-head"):
        shared = compress_context(qwen_pair, CONTEXT, method="ada-snapkv", budget=64, window=8, layout=layout)
        answers[layout] = [shared.ask(q, max_new_tokens=8).token_ids for q in QUESTIONS]
    assert answers["padded"] == answers["per-head"]


def test_a_result_names_the_guess_that_probed_its_cache(qwen_pair):
    """Query-agnostic SpecKV: the draft guesses an answer from the context alone; the result carries its
    text (the eval runner writes it into each row). SnapKV guesses nothing."""
    from tiny import long_context

    import draftkv

    compressed = draftkv.compress_context(qwen_pair, long_context(200), method="speckv", budget=48, window=8,
                                          max_new_tokens=8)
    guess = compressed.ask("what?", max_new_tokens=4).guess
    assert isinstance(guess, str) and guess
    plain = draftkv.generate(qwen_pair, long_context(200), "what?", method="snapkv", budget=48, max_new_tokens=4)
    assert plain.guess is None


def test_several_methods_share_one_compression_of_a_context(qwen_pair):
    from draftkv.context import compress_context_each
    from draftkv.methods import SnapKV, SpecKV

    methods = [SnapKV(budget=48, window=8), SpecKV(budget=48, window=8), "dense"]
    answers = {}
    for index, compressed in compress_context_each(qwen_pair, CONTEXT, methods, max_new_tokens=8):
        answers[index] = compressed.ask(QUESTIONS[0], max_new_tokens=8)
        assert "shared prefill" in answers[index].stats.note
    alone = [compress_context(qwen_pair, CONTEXT, method=m, max_new_tokens=8).ask(QUESTIONS[0], max_new_tokens=8)
             for m in methods]
    assert [answers[i].token_ids for i in range(3)] == [a.token_ids for a in alone]
    assert [answers[i].stats.kv_entries for i in range(3)] == [a.stats.kv_entries for a in alone]
