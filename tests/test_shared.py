"""One prefill and one draft pass shared by several KV methods give exactly the separate runs' results."""

from __future__ import annotations

import pytest
from conftest import assert_same_result
from tiny import long_context

from draftkv.errors import ConfigError
from draftkv.pipeline import generate_batch, generate_shared
from draftkv.types import Request

METHODS = [
    ("dense", {}), ("snapkv", {"budget": 48, "window": 8}), ("speckv", {"budget": 48, "window": 8}),
    ("speckv", {"budget": 64, "window": 8, "lookahead": 3}), ("h2o", {"budget": 48, "window": 8}),
    ("streamingllm", {"budget": 48}), ("pyramidkv", {"budget": 48, "window": 8}),
    ("ada-snapkv", {"budget": 48, "window": 8}), ("ada-speckv", {"budget": 48, "window": 8, "layout": "padded"}),
    ("laq", {"budget": 48}), ("snapkv", {"budget": 10_000}),
]


def test_shared_equals_separate(pair):
    from draftkv.methods import get_method

    request = Request(context=long_context(260, seed=41), question="what is the magic number?", max_new_tokens=10)
    methods = [get_method(name, **params) for name, params in METHODS]
    calls = []
    prefills = pair.target.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: calls.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        shared = generate_shared(pair, request, methods)
    finally:
        prefills.remove()
    prompt_length = shared[0].stats.prompt_tokens
    assert calls.count(prompt_length) == 1  # one prefill of the prompt for all eleven
    for method, together in zip(methods, shared, strict=True):
        alone = generate_batch(pair, [request], method)[0]
        assert_same_result(together, alone)
        assert "shared prefill" in together.stats.note


def test_prompt_methods_cannot_share(qwen_pair):
    request = Request(context=long_context(100), question="what?")
    with pytest.raises(ConfigError, match="cannot share a prefill"):
        generate_shared(qwen_pair, request, ["snapkv", "specpc"])
