"""PyramidKV, Ada-KV and the ragged cache that makes their savings real."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import long_context

from draftkv.api import generate, generate_batch, prepare_batch
from draftkv.engine.attention import ragged_attention
from draftkv.engine.cache import PaddedLayer, PerHeadLayer, kv_bytes, ragged_cache
from draftkv.engine.decoding import DecodeSpec, decode
from draftkv.errors import ConfigError
from draftkv.flow.steps import eos_ids
from draftkv.methods import PyramidKV, SnapKV, get_method
from draftkv.methods.base import adaptive_positions
from draftkv.prompt import encode_prompt
from draftkv.types import Request

CONTEXT = long_context(300, seed=21)
QUESTION = "what is the magic number?"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 64), st.integers(1, 600), st.sampled_from([1, 5, 20, 50]))
def test_pyramid_layer_budgets_sum_as_specified(layers, window, chosen, beta):
    method = PyramidKV(budget=window + chosen, window=window, beta=beta)
    budgets = method.layer_budgets(layers, 10**6, window + chosen)
    assert sum(budgets) == layers * chosen  # the mean per layer stays budget - window
    assert budgets == sorted(budgets, reverse=True)  # shrinking with depth
    if layers > 1:
        low = chosen / beta
        assert abs(budgets[0] - (2 * chosen - low)) <= 1 and abs(budgets[-1] - low) <= 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 30), st.integers(0, 20), st.floats(0, 1), st.integers(0, 10_000))
def test_adaptive_positions_share_the_layer_budget(heads, chosen, extra, alpha, seed):
    prefix = chosen + extra
    window = torch.arange(prefix, prefix + 4)
    pooled = torch.rand(heads, prefix, generator=torch.Generator().manual_seed(seed))
    kept = adaptive_positions(pooled, chosen, alpha, window)
    real = kept >= 0
    assert int(real.sum()) == heads * (chosen + 4)  # the layer keeps what a uniform split would
    for head in range(heads):
        positions = kept[head][real[head]].tolist()
        assert positions == sorted(set(positions)) and set(window.tolist()) <= set(positions)
        assert len(positions) - 4 >= int(alpha * chosen)  # the safety floor
        assert not real[head][: kept.shape[1] - len(positions)].any()  # empty slots at the front
    # Everything kept beyond the floors scores at least as high as anything dropped.
    chosen_mask = torch.zeros(heads, prefix, dtype=torch.bool)
    for head in range(heads):
        chosen_mask[head, [p for p in kept[head].tolist() if 0 <= p < prefix]] = True
    if (~chosen_mask).any() and alpha == 0:
        assert pooled[chosen_mask].min() >= pooled[~chosen_mask].max()


def test_alpha_one_is_uniform_snapkv(qwen_pair):
    uniform = generate(qwen_pair, CONTEXT, QUESTION, method="snapkv", budget=64, window=8, max_new_tokens=6)
    ada = generate(qwen_pair, CONTEXT, QUESTION, method="ada-snapkv", budget=64, window=8, alpha=1.0, max_new_tokens=6)
    assert ada.token_ids == uniform.token_ids
    for a, b in zip(ada.kept_positions, uniform.kept_positions, strict=True):
        assert torch.equal(a, b)


def test_ragged_cache_equals_the_uniform_cache_when_budgets_are_equal(qwen_pair):
    """The same kept entries in either ragged layout decode exactly like the uniform cache; with a
    head that keeps fewer entries, the two layouts (two implementations) still agree."""
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=10)
    uniform = prepare_batch(qwen_pair, [request], "snapkv", budget=64, window=8)
    model = qwen_pair.target.model
    n = len(encode_prompt(qwen_pair.tokenizer, request).ids)
    index = [kept[None] for kept in uniform.kept_rows[0]]

    def run(cache):
        with torch.inference_mode(), ragged_attention(model, cache):
            return decode(model, cache, uniform.first_logits, torch.tensor([n]), None,
                          DecodeSpec.greedy([10], eos_ids(model, qwen_pair.tokenizer))).rows[0].token_ids

    def ragged(valid, layout):
        return ragged_cache(prepare_batch(qwen_pair, [request], "dense").cache, index, valid, layout)

    expected = run(uniform.cache)
    all_valid = [torch.ones_like(i, dtype=torch.bool) for i in index]
    assert run(ragged(all_valid, "padded")) == expected
    assert run(ragged(all_valid, "per-head")) == expected
    fewer = [v.clone() for v in all_valid]
    fewer[1][0, 0, :20] = False  # one head of one layer keeps 20 entries fewer
    padded, per_head = ragged(fewer, "padded"), ragged(fewer, "per-head")
    assert run(padded) == run(per_head)
    assert kv_bytes(per_head) < kv_bytes(padded) == kv_bytes(uniform.cache)


@pytest.mark.parametrize("method", ["pyramidkv", "ada-snapkv", "ada-speckv"])
@pytest.mark.parametrize("layout", ["padded", "per-head"])
def test_ragged_methods_keep_dense_entries_and_save_memory(qwen_pair, method, layout):
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=8)
    prepared = prepare_batch(qwen_pair, [request], method, budget=64, window=8, layout=layout)
    dense = prepare_batch(qwen_pair, [request], "dense")
    real_entries = 0
    for layer, (ragged, full, kept) in enumerate(zip(prepared.cache.layers, dense.cache.layers,
                                                     prepared.kept_rows[0], strict=True)):
        for head in range(kept.shape[0]):
            positions = kept[head][kept[head] >= 0]
            real_entries += len(positions)
            stored = ragged.head_keys[0][head] if isinstance(ragged, PerHeadLayer) else \
                ragged.keys[0, head][ragged.valid[0, head]]
            assert torch.equal(stored, full.keys[0, head, positions]), f"layer {layer} head {head}"
    heads, layers = kept.shape[0], len(prepared.kept_rows[0])
    assert real_entries == layers * heads * 64  # the per-head budgets sum to the uniform total
    stats = generate(qwen_pair, CONTEXT, QUESTION, method=method, budget=64, window=8, layout=layout,
                     max_new_tokens=4).stats
    assert stats.kv_bytes * stats.prompt_tokens == stats.kv_bytes_dense * 64  # bytes of the budgets
    if layout == "per-head":
        assert stats.kv_bytes_stored == stats.kv_bytes  # exact storage
    else:
        assert stats.kv_bytes <= stats.kv_bytes_stored < stats.kv_bytes_dense


def test_a_ragged_layer_without_empty_slots_is_stored_whole(qwen_pair):
    # PyramidKV's heads keep one number of entries per layer: at batch 1 no slot is empty, so the
    # per-head layout would hold the same bytes and pay a copy per head each step; a decoding step
    # then needs no mask either.
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=8)
    per_head = prepare_batch(qwen_pair, [request], "pyramidkv", budget=64, window=8, layout="per-head")
    lengths = {layer.keys.shape[2] for layer in per_head.cache.layers}
    assert len(lengths) > 1  # the layers still differ: the cache is ragged
    assert all(type(layer) is PaddedLayer and layer.full for layer in per_head.cache.layers)
    assert per_head.cache.layers[0].mask(1, 2) is None and per_head.cache.layers[0].mask(3, 2) is not None
    ada = prepare_batch(qwen_pair, [request], "ada-snapkv", budget=64, window=8, layout="per-head")
    assert any(isinstance(layer, PerHeadLayer) for layer in ada.cache.layers)  # heads differ: stored per head
    answers = {layout: generate(qwen_pair, CONTEXT, QUESTION, method="pyramidkv", budget=64, window=8, layout=layout,
                                max_new_tokens=8).token_ids for layout in ("padded", "per-head")}
    assert answers["padded"] == answers["per-head"]


@pytest.mark.parametrize("method", ["pyramidkv", "ada-speckv"])
@pytest.mark.parametrize("layout", ["padded", "per-head"])
def test_ragged_batch_equals_one_by_one(qwen_pair, method, layout):
    requests = [Request(context=long_context(260, seed=2), question=QUESTION, max_new_tokens=6),
                Request(context=long_context(150, seed=3), question="who?", max_new_tokens=6),
                Request(context="tiny", question="x?", max_new_tokens=6)]
    batched = generate_batch(qwen_pair, requests, method, budget=48, window=8, layout=layout)
    for request, together in zip(requests, batched, strict=True):
        assert together.token_ids == generate_batch(qwen_pair, [request], method, budget=48, window=8,
                                                    layout=layout)[0].token_ids


def test_budget_at_least_prompt_is_dense_for_ragged_methods(qwen_pair):
    dense = generate(qwen_pair, CONTEXT, QUESTION, max_new_tokens=8)
    for method in ("pyramidkv", "ada-snapkv", "ada-speckv"):
        result = generate(qwen_pair, CONTEXT, QUESTION, method=method, budget=1.0, max_new_tokens=8)
        assert result.token_ids == dense.token_ids and not result.stats.compressed


def test_bad_adaptive_parameters():
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\]"):
        get_method("ada-snapkv", alpha=1.5)
    with pytest.raises(ConfigError, match="alpha"):
        get_method("ada-speckv", alpha=-0.1)
    with pytest.raises(ConfigError, match="no parameter 'adaptive'"):
        get_method("streamingllm", adaptive=True)  # nothing to adapt: it has no scores
    with pytest.raises(ConfigError, match="layout must be one of padded, per-head"):
        get_method("pyramidkv", layout="flat")
    with pytest.raises(ConfigError, match="beta"):
        get_method("pyramidkv", beta=0)
    assert SnapKV(adaptive=True).adaptive
