"""Allocations (uniform, pyramid, ada, global) and the ragged cache that makes their savings real."""

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
from draftkv.methods import SnapKV, get_method
from draftkv.methods.allocation import ALLOCATIONS, Ada, Global, Pyramid, Uniform
from draftkv.methods.base import with_window
from draftkv.prompt import encode_prompt
from draftkv.types import Request

CONTEXT = long_context(300, seed=21)
QUESTION = "what is the magic number?"


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 600), st.sampled_from([1, 5, 20, 50]))
def test_pyramid_layer_counts_sum_as_specified(layers, chosen, beta):
    counts = Pyramid(beta).layer_counts(layers, chosen)
    assert sum(counts) == layers * chosen  # the mean per layer stays budget - window
    assert counts == sorted(counts, reverse=True)  # shrinking with depth
    if layers > 1:
        low = chosen / beta
        assert abs(counts[0] - (2 * chosen - low)) <= 1 and abs(counts[-1] - low) <= 1


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 5), st.integers(1, 8), st.integers(1, 30), st.integers(0, 20), st.floats(0, 1),
       st.sampled_from(sorted(ALLOCATIONS)), st.integers(0, 10_000))
def test_every_allocation_keeps_the_uniform_total(layers, heads, chosen, extra, alpha, name, seed):
    """Whatever the spread, the cache holds chosen x layers x heads entries by score (pyramid: unless a
    layer's share exceeds the prompt, which then keeps all of it); each allocation's own rule holds."""
    prefix = chosen + extra
    generator = torch.Generator().manual_seed(seed)
    pooled = [torch.randint(0, 6, (heads, prefix), generator=generator).float() for _ in range(layers)]
    allocation = {"ada": Ada(alpha), "pyramid": Pyramid(5)}.get(name) or ALLOCATIONS[name]()
    masks = allocation.select(pooled, chosen)
    kept = torch.stack(masks)
    assert kept.shape == (layers, heads, prefix) and kept.dtype == torch.bool
    counts = Pyramid(5).layer_counts(layers, chosen)
    capped = sum(heads * min(count, prefix) for count in counts) if name == "pyramid" else layers * heads * chosen
    assert int(kept.sum()) == capped
    per_layer = kept.sum(dim=(1, 2)).tolist()
    per_head = kept.sum(dim=2)
    scores = torch.stack(pooled)
    if name == "uniform":
        assert (per_head == chosen).all()
    if name == "pyramid":
        assert per_layer == [heads * min(count, prefix) for count in counts]
        assert (per_head == per_head[:, :1]).all()  # the heads of a layer keep the same number
    if name == "ada":
        assert per_layer == [heads * chosen] * layers  # a layer keeps what a uniform split would
        assert (per_head >= int(alpha * chosen)).all()  # the safety floor
    if name == "global" and (~kept).any():  # one threshold: nothing dropped beats anything kept
        assert scores[kept].min() >= scores[~kept].max()
    if name in ("uniform", "pyramid"):  # each head's own best
        for layer in range(layers):
            for head in range(heads):
                row, mask = scores[layer, head], kept[layer, head]
                if mask.any() and (~mask).any():
                    assert row[mask].min() >= row[~mask].max()


def test_global_allocation_follows_the_scores_across_layers():
    """A layer whose entries score higher keeps more of the shared total; uniform keeps the same in each."""
    strong, weak = torch.full((2, 10), 0.5), torch.full((2, 10), 0.1)
    strong[:, 0] = weak[:, 0] = 1.0  # each layer's best entry outranks everything else
    masks = Global().select([strong, weak], 3)
    assert int(masks[0].sum()) == 10 and masks[1].sum(dim=-1).tolist() == [1, 1]
    assert [int(m.sum()) for m in Uniform().select([strong, weak], 3)] == [6, 6]


def test_with_window_pads_shorter_heads_at_the_front():
    mask = torch.tensor([[True, False, True, True], [False, True, False, False]])
    kept = with_window(mask, torch.arange(4, 6))
    assert kept.tolist() == [[0, 2, 3, 4, 5], [-1, -1, 1, 4, 5]]


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


def test_bad_allocation_parameters():
    with pytest.raises(ConfigError, match=r"alpha must be a number in \[0, 1\]"):
        get_method("ada-snapkv", alpha=1.5)
    with pytest.raises(ConfigError, match="alpha"):
        get_method("ada-speckv", alpha=-0.1)
    with pytest.raises(ConfigError, match="no parameter 'allocation'"):
        get_method("streamingllm", allocation="ada")  # nothing to spread: it keeps by position
    with pytest.raises(ConfigError, match="allocation must be one of uniform, pyramid, ada, global; got 'even'"):
        get_method("snapkv", allocation="even")
    with pytest.raises(ConfigError, match="decode-time eviction keeps a uniform cache"):
        get_method("snapkv", allocation="global", evict_every=16)
    with pytest.raises(ConfigError, match="layout must be one of padded, per-head"):
        get_method("pyramidkv", layout="flat")
    with pytest.raises(ConfigError, match="beta"):
        get_method("pyramidkv", beta=0)
    assert SnapKV(allocation="ada").allocation == "ada"
    assert {name: get_method(name).allocation for name in ("snapkv", "speckv", "h2o", "laq", "pyramidkv",
                                                              "ada-snapkv", "ada-speckv")} == {
        "snapkv": "uniform", "speckv": "uniform", "h2o": "uniform", "laq": "uniform", "pyramidkv": "pyramid",
        "ada-snapkv": "ada", "ada-speckv": "ada"}  # each method's authors' own
