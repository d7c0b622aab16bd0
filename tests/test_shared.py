"""One prefill shared by several KV methods, and one draft pass shared by prompt and KV methods, give
exactly the separate runs' results."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_result
from tiny import long_context

from draftkv.errors import ConfigError
from draftkv.pipeline import generate_batch, generate_shared, shared_draft
from draftkv.types import Request

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
    shared, calls = forward_lengths(pair.target.model, lambda: generate_shared(pair, request, methods))
    prompt_length = shared[0].stats.prompt_tokens
    assert calls.count(prompt_length) == 1  # one prefill of the prompt for all eleven
    for method, together in zip(methods, shared, strict=True):
        alone = generate_batch(pair, [request], method)[0]
        assert_same_result(together, alone)
        assert "shared prefill" in together.stats.note


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
    drafts, calls = forward_lengths(pair.draft.model, lambda: shared_draft(pair, request, methods))
    assert drafts is not None and calls[0] > 1 and calls.count(calls[0]) == 1  # one prefill of the prompt
    # Then the longest lookahead (10 tokens), each of them fed, so that speckv-pc's prompt scoring sees them.
    assert len(calls) == 1 + 10
    for method, drafted in zip(methods, drafts, strict=True):
        assert (drafted.view is None) == (method.name in ("dense", "keep-ends"))
        together = generate_batch(pair, [request], method, drafted=drafted)[0]
        alone = generate_batch(pair, [request], method)[0]
        assert_same_result(together, alone)
        assert (together.kept_tokens is None) == (alone.kept_tokens is None)
        if alone.kept_tokens is not None:
            assert torch.equal(together.kept_tokens, alone.kept_tokens)
            assert len(alone.kept_tokens) == 120  # the prompt stage did drop tokens
    group = [m for m in methods if m.name in ("speckv", "dense")]
    longest = drafts[0]  # speckv with the default lookahead (10) is the longest here
    for together, method in zip(generate_shared(pair, request, group, drafted=longest), group, strict=True):
        assert_same_result(together, generate_batch(pair, [request], method)[0])


def test_nothing_to_share_without_two_draft_users(qwen_pair):
    request = Request(context=long_context(100), question="what?")
    assert shared_draft(qwen_pair, request, ["dense", "snapkv", "specprefill"]) is None
    # A method the draft cannot serve (SpecPC's default start layer is past the tiny draft's 2 layers)
    # is left to fail on its own.
    assert shared_draft(qwen_pair, request, ["speckv", "specprefill", "specpc"]) is None


def test_prompt_methods_cannot_share(qwen_pair):
    request = Request(context=long_context(100), question="what?")
    with pytest.raises(ConfigError, match="cannot share a prefill"):
        generate_shared(qwen_pair, request, ["snapkv", "specpc"])
