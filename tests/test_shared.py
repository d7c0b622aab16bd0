"""The executor's sharing: one prefill shared by several KV methods, and one draft pass shared by prompt
and KV methods, give exactly the separate runs' results."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_result
from hypothesis import given
from hypothesis import strategies as st
from tiny import long_context

from draftkv.api import generate_batch
from draftkv.errors import ConfigError
from draftkv.flow import run
from draftkv.flow.results import decode_groups
from draftkv.types import Request, Sampling

METHODS = [
    ("dense", {}), ("snapkv", {"budget": 48, "window": 8}), ("speckv", {"budget": 48, "window": 8}),
    ("speckv", {"budget": 64, "window": 8, "lookahead": 3}), ("h2o", {"budget": 48, "window": 8}),
    ("streamingllm", {"budget": 48}), ("pyramidkv", {"budget": 48, "window": 8}),
    ("ada-snapkv", {"budget": 48, "window": 8}), ("ada-speckv", {"budget": 48, "window": 8, "layout": "padded"}),
    ("laq", {"budget": 48}), ("snapkv", {"budget": 10_000}),
]


def forward_lengths(model, run):
    """`run()`'s result, and the input length of each forward call `model` made meanwhile."""
    calls = []
    hook = model.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                           with_kwargs=True)
    try:
        return run(), calls
    finally:
        hook.remove()


def test_shared_equals_separate(pair):
    from draftkv.methods import get_method

    request = Request(context=long_context(260, seed=41), question="what is the magic number?", max_new_tokens=10)
    methods = [get_method(name, **params) for name, params in METHODS]
    shared, calls = forward_lengths(pair.target.model, lambda: [r[0] for r in run(pair, [request], methods)])
    prompt_length = shared[0].stats.prompt_tokens
    assert calls.count(prompt_length) == 1  # one prefill of the prompt for all eleven
    for method, together in zip(methods, shared, strict=True):
        alone = generate_batch(pair, [request], method)[0]
        assert_same_result(together, alone)
        assert "shared prefill" in together.stats.note


def test_settings_that_score_alike_share_one_scoring_of_the_prefill(pair, monkeypatch):
    """Two budgets of one method score the prompt once through the prefill; each then keeps what its own
    budget and its own probe (a shorter lookahead here) give, exactly as alone."""
    from draftkv.methods import WindowScorer, get_method

    made, real = [], WindowScorer.collector
    monkeypatch.setattr(WindowScorer, "collector", lambda scorer, width: made.append(scorer) or real(scorer, width))
    request = Request(context=long_context(260, seed=43), question="what is the magic number?", max_new_tokens=8)
    methods = [get_method("h2o", budget=40, window=8), get_method("h2o", budget=56, window=8),
               get_method("speckv", budget=40, window=8), get_method("speckv", budget=56, window=8, lookahead=3)]
    shared = [r[0] for r in run(pair, [request], methods)]
    assert len(made) == len(set(made)) == 2  # all prompt queries (H2O), the window (SpecKV)
    for method, together in zip(methods, shared, strict=True):
        assert_same_result(together, generate_batch(pair, [request], method)[0])


DRAFT_USERS = [
    ("speckv", {"budget": 48, "window": 8}), ("speckv", {"budget": 48, "window": 8, "lookahead": 3}),
    ("specpc", {"budget": 120, "start_layer": 0}), ("specpc", {"budget": 120, "lookahead": 4, "start_layer": 1}),
    ("specprefill", {"budget": 120}), ("lingua", {"budget": 120}),
    ("speckv-pc", {"budget": 48, "prompt_budget": 120, "start_layer": 0}), ("dense", {}), ("keep-ends", {"budget": 120}),
]


def test_one_draft_pass_serves_prompt_and_kv_methods(pair):
    from draftkv.methods import get_method

    request = Request(context=long_context(260, seed=43), question="what is the magic number?", max_new_tokens=10)
    methods = [get_method(name, **params) for name, params in DRAFT_USERS]
    results, calls = forward_lengths(pair.draft.model, lambda: [r[0] for r in run(pair, [request], methods)])
    assert calls[0] > 1 and calls.count(calls[0]) == 1  # one prefill of the prompt
    # Then the longest lookahead (10 tokens), each of them fed, so that speckv-pc's prompt scoring sees them.
    assert len(calls) == 1 + 10
    for method, together in zip(methods, results, strict=True):
        assert (together.stats.lookahead_tokens == 0) == (method.name in ("dense", "keep-ends", "lingua"))
        alone = generate_batch(pair, [request], method)[0]
        assert_same_result(together, alone)
        assert (together.kept_tokens is None) == (alone.kept_tokens is None)
        if alone.kept_tokens is not None:
            assert torch.equal(together.kept_tokens, alone.kept_tokens)
            assert len(alone.kept_tokens) == 120  # the prompt stage did drop tokens


def test_a_method_the_draft_cannot_serve_fails_with_its_reason(qwen_pair):
    from draftkv.methods import get_method

    request = Request(context=long_context(100), question="what?")
    # A start layer past the tiny draft's 2 layers.
    specpc = get_method("specpc", budget=60, window=16, kernel=7, neighbourhood=8, start_layer=8)
    with pytest.raises(ConfigError, match="start_layer is 8 but the draft has 2 layers"):
        run(qwen_pair, [request], ["speckv", "specprefill", specpc])


def test_prompt_methods_read_their_own_prompt_and_kv_methods_share_one(qwen_pair):
    request = Request(context=long_context(260, seed=44), question="what?", max_new_tokens=4)
    methods = ["dense", "snapkv", "specprefill", "keep-last"]
    params = {"snapkv": {"budget": 48, "window": 8}, "specprefill": {"budget": 120}, "keep-last": {"budget": 100}}
    from draftkv.methods import get_method

    chosen = [get_method(m, **params.get(m, {})) for m in methods]
    results, calls = forward_lengths(qwen_pair.target.model, lambda: [r[0] for r in run(qwen_pair, [request], chosen)])
    prefills = [width for width in calls if width > 1]
    assert prefills == [results[0].stats.prompt_tokens, 120, 100]  # one full prefill, then each prompt method's own
    assert ["shared prefill" in r.stats.note for r in results] == [True, True, False, False]
    for method, together in zip(chosen, results, strict=True):
        assert_same_result(together, generate_batch(qwen_pair, [request], method)[0])


def test_caches_decoded_together_keep_each_rows_own_tokens_stops_and_sampling(pair):
    """Two requests of different lengths (a padded batch), each with its own length, stop string and
    sampling, through methods of every cache layout decoded as one batch: each row as decoded alone."""
    from draftkv.methods import get_method

    requests = [Request(context=long_context(260, seed=41), question="what is the magic number?", max_new_tokens=9,
                        ignore_eos=True, sampling=Sampling(temperature=0.8, top_p=0.9, seed=5)),
                Request(context=long_context(140, seed=42), question="when is the launch?", max_new_tokens=5,
                        ignore_eos=True, stop=("e",))]
    methods = [get_method(name, **params) for name, params in [*METHODS, *DRAFT_USERS]]
    methods.append(get_method("snapkv", budget=48, window=8, evict_every=2))  # decodes alone
    together = run(pair, requests, methods, decode_together=True)
    for method, rows in zip(methods, together, strict=True):
        for row, alone in zip(rows, run(pair, requests, [method])[0], strict=True):
            assert_same_result(row, alone)
            assert row.text == alone.text and row.finish_reason == alone.finish_reason, method.name
    assert "decoded in one batch" in together[0][0].stats.note
    assert "decoded in one batch" not in together[-1][0].stats.note


def test_methods_decoded_together_cannot_stream(qwen_pair):
    with pytest.raises(ConfigError, match="decoded together"):
        run(qwen_pair, [Request(context="a b c", question="q")], ["dense", "snapkv"], decode_together=True,
            on_text=lambda row, text: None)


def least_cost(widths: list[int], entry_bytes: int, weight_bytes: int) -> int:
    """Brute force over every partition of the rows into groups."""
    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for smaller in partitions(rest):
            yield [[first], *smaller]
            for at in range(len(smaller)):
                yield [*smaller[:at], [first, *smaller[at]], *smaller[at + 1:]]
    return min(sum(weight_bytes + len(g) * max(widths[i] for i in g) * entry_bytes for g in p)
               for p in partitions(list(range(len(widths)))))


@given(widths=st.lists(st.integers(1, 5000), min_size=1, max_size=6), entry_bytes=st.integers(1, 100),
       weight_bytes=st.integers(0, 10**6))
def test_decode_groups_split_the_rows_where_it_reads_least(widths, entry_bytes, weight_bytes):
    groups = decode_groups(widths, entry_bytes, weight_bytes)
    assert sorted(i for g in groups for i in g) == list(range(len(widths)))
    cost = sum(weight_bytes + len(g) * max(widths[i] for i in g) * entry_bytes for g in groups)
    assert cost == least_cost(widths, entry_bytes, weight_bytes)


@pytest.mark.parametrize("backend", ["eager", "static"])
def test_padding_only_a_finished_row_needed_is_dropped_with_it(pair, backend):
    """Settings decoded together are padded to the widest cache (dense on the long prompt). Once that row
    and half the others are done, the running rows go on over their own width only, with their tokens."""
    import dataclasses

    from draftkv.methods import get_method

    chosen = dataclasses.replace(pair, decode=backend)
    requests = [Request(context=long_context(300, seed=7), question="what?", max_new_tokens=2, ignore_eos=True),
                Request(context=long_context(120, seed=8), question="what?", max_new_tokens=10, ignore_eos=True)]
    methods = [get_method("dense"), get_method("snapkv", budget=48, window=8)]
    widths = []  # the cache's first layer, as each decode step sees it

    def record(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            widths.append(kwargs["cache"].layers[0].keys.shape[2])

    hook = pair.target.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        together = run(chosen, requests, methods, decode_together=True)
    finally:
        hook.remove()
    long_prompt = together[0][0].stats.prompt_tokens
    assert max(widths) >= long_prompt  # all four rows, padded to dense's long prompt
    assert widths[-1] < long_prompt - 100  # the two rows of the short request alone, without that padding
    for method, rows in zip(methods, together, strict=True):
        for row, alone in zip(rows, run(chosen, requests, [method])[0], strict=True):
            assert row.token_ids == alone.token_ids, method.name


@pytest.mark.parametrize("backend", ["eager", "static"])
def test_finished_rows_leave_the_batch_and_the_others_keep_their_tokens(pair, backend):
    """Once half the rows are done, the decode goes on with the running rows alone (smaller steps), and
    every row still gets the tokens it gets alone; ragged caches included."""
    import dataclasses

    from draftkv.methods import get_method

    chosen = dataclasses.replace(pair, decode=backend)
    requests = [Request(context=long_context(120 + 20 * i, seed=i), question="what?", max_new_tokens=n,
                        ignore_eos=True) for i, n in enumerate([2, 3, 2, 12])]
    for method in (get_method("dense"), get_method("ada-snapkv", budget=48, window=8)):
        batch_sizes = []
        hook = pair.target.model.register_forward_pre_hook(
            lambda _m, _a, kwargs, sizes=batch_sizes: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
        try:
            together = run(chosen, requests, [method])[0]
        finally:
            hook.remove()
        assert batch_sizes[-1] == 1 and 4 in batch_sizes  # decode steps: all four rows, then the last alone
        for request, result in zip(requests, together, strict=True):
            assert result.token_ids == run(chosen, [request], [method])[0][0].token_ids, method.name
