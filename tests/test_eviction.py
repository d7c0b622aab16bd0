"""Decode-time eviction keeps the cache bounded during long generations."""

from __future__ import annotations

import pytest
import torch
from tiny import long_context
from transformers import DynamicCache

from draftkv.api import generate, generate_batch
from draftkv.engine.cache import SlotLayer, cache_of_layers
from draftkv.engine.eviction import DecodeEviction
from draftkv.errors import ConfigError
from draftkv.methods import H2O, StreamingLLM, get_method
from draftkv.types import Request

CONTEXT = long_context(260, seed=31)
QUESTION = "what is the magic number?"
METHODS = [("streamingllm", {}), ("h2o", {"window": 8}), ("snapkv", {"window": 8}), ("speckv", {"window": 8}),
           ("keydiff", {"window": 8})]


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_the_cache_never_grows_past_budget_plus_k(qwen_pair, method, params):
    # A long answer (ignore_eos): the tiny model may stop early.
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=30, ignore_eos=True)
    lengths = []
    hook = qwen_pair.target.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: lengths.append((kwargs["input_ids"].shape[1], kwargs["cache"].get_seq_length())),
        with_kwargs=True)
    try:
        result = generate_batch(qwen_pair, [request], method, budget=40, evict_every=4, **params)[0]
    finally:
        hook.remove()
    decoding = [length for width, length in lengths if width == 1][-(result.stats.new_tokens - 1):]
    assert len(decoding) == 29
    assert max(decoding) <= 40 + 4 - 1  # the cache the next token sees: at most budget + k - 1 before it is added
    assert min(decoding) == 40  # cut back to the budget
    assert "decode-time eviction ran" in result.stats.note


@pytest.mark.parametrize(("method", "params"), METHODS)
def test_no_eviction_when_k_exceeds_the_answer(qwen_pair, method, params):
    plain = generate(qwen_pair, CONTEXT, QUESTION, method=method, budget=40, max_new_tokens=10, **params)
    never = generate(qwen_pair, CONTEXT, QUESTION, method=method, budget=40, max_new_tokens=10, evict_every=50, **params)
    assert never.token_ids == plain.token_ids


def cache_of_positions(length: int, heads: int = 2, layers: int = 2) -> DynamicCache:
    """A cache whose keys hold their own position, so what survives eviction can be read back."""
    positions = torch.arange(length, dtype=torch.float).view(1, 1, length, 1).expand(1, heads, length, 4)
    return cache_of_layers([SlotLayer(positions.clone(), positions.clone(), room=8) for _ in range(layers)])


def test_streamingllm_eviction_keeps_sinks_and_the_recent_tokens():
    method = StreamingLLM(budget=10, sink=2, evict_every=3)
    eviction = DecodeEviction(None, method.keep_positions, method.evict_every, budget=10)
    cache = cache_of_positions(13)
    for _ in range(2):
        eviction.after_step(cache)
        assert cache.get_seq_length() == 13  # not yet: every 3 steps
    eviction.after_step(cache)
    for layer in cache.layers:
        assert layer.keys[0, :, :, 0].tolist() == [[0, 1, 5, 6, 7, 8, 9, 10, 11, 12]] * 2


def test_h2o_eviction_keeps_the_entries_that_received_most_attention():
    method = H2O(budget=4, window=2, evict_every=1)
    eviction = DecodeEviction(method.kv_scorer().decode_collector(), method.keep_positions, 1, budget=4)
    heads, length = 2, 8
    # Two decoding steps whose query attends sharply to entries 1 and 4 (head 0) and 2 and 3 (head 1).
    for step in range(2):
        key = torch.zeros(1, heads, length - 1 + step, 4)
        key[0, 0, [1, 4], 0] = 10.0
        key[0, 1, [2, 3], 0] = 10.0
        query = torch.zeros(1, heads, 1, 4)
        query[..., 0] = 1.0
        for layer in range(2):
            eviction.observe(layer, query, key, None, 1.0)
    cache = cache_of_positions(length, heads)
    eviction.after_step(cache)
    # The heavy hitters of each head, and the most recent `window` entries.
    assert cache.layers[0].keys[0, :, :, 0].tolist() == [[1, 4, 6, 7], [2, 3, 6, 7]]


def test_keydiff_eviction_keeps_the_sinks_the_recent_entries_and_the_most_unusual_keys():
    """KeyDiff's own scorer evicts while decoding: the cache's keys as they are now, no attention read."""
    method = get_method("keydiff", budget=5, window=2, sink=1, evict_every=1)
    eviction = DecodeEviction(method.kv_scorer().decode_collector(), method.keep_positions, 1, budget=5)
    cache = cache_of_positions(9)
    for layer in cache.layers:  # every key alike but two, which head 0 holds at 3 and 5, head 1 at 2 and 6
        layer.keys[..., :] = 1.0
        layer.keys[0, 0, [3, 5]] = torch.tensor([-1.0, 1.0, -1.0, 1.0])
        layer.keys[0, 1, [2, 6]] = torch.tensor([1.0, -1.0, 1.0, -1.0])
        layer.values[..., 0] = torch.arange(9, dtype=torch.float)
    eviction.after_step(cache)
    assert cache.layers[0].values[0, :, :, 0].tolist() == [[0, 3, 5, 7, 8], [0, 2, 6, 7, 8]]


def test_batches_with_eviction_equal_one_by_one(qwen_pair):
    requests = [Request(context=long_context(200, seed=s), question=QUESTION, max_new_tokens=12) for s in (1, 2)]
    together = generate_batch(qwen_pair, requests, "snapkv", budget=40, window=8, evict_every=3)
    for request, result in zip(requests, together, strict=True):
        alone = generate_batch(qwen_pair, [request], "snapkv", budget=40, window=8, evict_every=3)[0]
        assert result.token_ids == alone.token_ids


def test_bad_eviction_settings():
    with pytest.raises(ConfigError, match="evict_every"):
        get_method("snapkv", evict_every=-1)
    with pytest.raises(ConfigError, match="decode-time eviction keeps a uniform cache"):
        get_method("ada-snapkv", evict_every=4)
    with pytest.raises(ConfigError, match="cannot combine"):
        get_method("pyramidkv", evict_every=4)
