"""The importance primitive against a naive full-attention reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draftkv.engine import scoring
from draftkv.engine.attention import WindowCollector
from draftkv.engine.scoring import pool_scores, reduced_count, window_scores


def naive_attention(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Full causal attention probabilities [B, H_q, k, k] with GQA, the slow obvious way."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    logits = query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1])
    length = key.shape[2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)


shapes = st.tuples(
    st.integers(1, 2),  # batch
    st.sampled_from([(4, 2), (4, 4), (6, 2), (2, 1)]),  # (query heads, kv heads)
    st.integers(1, 12),  # window queries
    st.integers(1, 40),  # prefix keys
    st.sampled_from(["max", "mean"]),
)


@settings(max_examples=60, deadline=None)
@given(shapes, st.integers(0, 10_000))
def test_window_scores_match_full_attention(shape, seed):
    batch, (heads, kv_heads), window, prefix, reduction = shape
    generator = torch.Generator().manual_seed(seed)
    length = prefix + window
    query = torch.randn(batch, heads, length, 8, generator=generator)
    key = torch.randn(batch, kv_heads, length, 8, generator=generator)

    got = window_scores(query[:, :, -window:], key, prefix_length=prefix, reduction=reduction)

    probs = naive_attention(query, key)[:, :, -window:, :prefix]  # window rows, prefix columns
    grouped = probs.reshape(batch, kv_heads, heads // kv_heads * window, prefix)
    expected = grouped.amax(dim=2) if reduction == "max" else grouped.sum(dim=2)
    assert got.shape == (batch, kv_heads, prefix)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunks", [{"_MAX_PROBABILITY_BYTES": 4 * 4 * 50 * 3},  # 3 queries per product
                                    {"_KEY_CHUNK": 7}, {"_KEY_CHUNK": 7, "_MAX_PROBABILITY_BYTES": 4 * 4 * 50}])
@pytest.mark.parametrize(("window", "prefix"), [(20, 30), (50, 50), (50, 45)])  # 50 of 50: every query (H2O)
def test_chunked_queries_and_keys_give_the_same_scores(monkeypatch, chunks, window, prefix):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, 4, 50, 8, generator=generator)
    key = torch.randn(1, 2, 50, 8, generator=generator)
    whole = window_scores(query[:, :, -window:], key, prefix_length=prefix, reduction="mean")
    for name, value in chunks.items():
        monkeypatch.setattr(scoring, name, value)
    chunked = window_scores(query[:, :, -window:], key, prefix_length=prefix, reduction="mean")
    torch.testing.assert_close(chunked, whole)
    # Early query chunks skip the keys after their last query; the sums must still be every query's.
    expected = naive_attention(query, key)[:, :, -window:, :prefix].reshape(1, 2, 2 * window, prefix).sum(dim=2)
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)


def test_padding_mask_and_invalid_queries_are_excluded():
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(1, 2, 4, 8, generator=generator)
    key = torch.randn(1, 2, 10, 8, generator=generator)
    allowed = torch.ones(1, 1, 4, 10, dtype=torch.bool).tril(diagonal=6)
    allowed[..., :3] = False  # three padded keys
    valid = torch.tensor([[True, False, True, False]])
    scores = window_scores(query, key, prefix_length=6, allowed=allowed, query_weight=valid, reduction="max")
    assert torch.all(scores[..., :3] == 0)
    only_valid = window_scores(query[:, :, [0, 2]], key, prefix_length=6, allowed=allowed[:, :, [0, 2]])
    torch.testing.assert_close(scores, only_valid)


def test_collector_combines_calls_exactly():
    """Scoring the window and a later chunk of queries in two calls equals one call over both."""
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(1, 4, 30, 8, generator=generator)
    key = torch.randn(1, 2, 30, 8, generator=generator)
    for reduction in ("max", "mean"):
        collector = WindowCollector(prefix_length=18, reduction=reduction)
        collector.score_last(7)  # the prompt's window: queries 18..24 of a 25-token prompt
        collector.observe(0, query[:, :, :25], key[:, :, :25], None, None)
        collector.score_last(5)  # then 5 probe tokens
        collector.observe(0, query[:, :, 25:], key, None, None)
        together = window_scores(query[:, :, 18:], key, prefix_length=18, reduction=reduction)
        if reduction == "mean":
            together = together / (2 * 12)
        torch.testing.assert_close(collector.layer_scores()[0], together)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 60), st.sampled_from([1, 3, 5, 7, 63]), st.sampled_from(["max", "avg"]))
def test_pooling_keeps_length_and_bounds(length, kernel, pooling):
    scores = torch.rand(2, 3, length)
    pooled = pool_scores(scores, kernel, pooling)
    assert pooled.shape == scores.shape
    if pooling == "max":
        assert torch.all(pooled >= scores)
        assert torch.all(pooled <= scores.amax(dim=-1, keepdim=True))


def test_even_kernel_is_refused():
    with pytest.raises(ValueError, match="odd"):
        pool_scores(torch.rand(1, 1, 10), 4)


def test_a_mean_over_the_reduced_count_is_a_mean():
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 5, 8, generator=generator)
    key = torch.randn(1, 2, 25, 8, generator=generator)
    summed = window_scores(query, key, prefix_length=20, reduction="mean")
    count = reduced_count(4, 2, 5)
    assert count == 10  # two query heads per KV head, five queries
    scores = summed / count
    # Each probability is <= 1, so a mean (unlike a sum over 10 query-head pairs) is <= 1 too.
    assert torch.all(scores <= 1) and torch.all(scores >= 0) and torch.any(summed > 1)
