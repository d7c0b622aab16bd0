"""Method configs, the registry, and the selection rule as properties."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from draftkv.engine.scoring import pool_scores
from draftkv.errors import ConfigError, PromptError, UnknownMethodError
from draftkv.methods import METHODS, SnapKV, SpecKV, get_method
from draftkv.methods.base import resolve_budget


@settings(max_examples=80, deadline=None)
@given(
    st.integers(1, 4),  # KV heads
    st.integers(1, 16),  # window
    st.integers(1, 60),  # budget beyond the window
    st.integers(1, 200),  # prompt length beyond the budget
    st.sampled_from([1, 3, 7]),
    st.sampled_from(["max", "avg"]),
    st.integers(0, 10_000),
)
def test_keep_positions_invariants(heads, window, extra, longer, kernel, pooling, seed):
    budget = window + extra
    n = budget + longer
    method = SnapKV(budget=budget, window=window, kernel=kernel, pooling=pooling)
    scores = torch.rand(heads, n - window, generator=torch.Generator().manual_seed(seed))
    (kept,) = method.keep_positions([scores], n, budget)

    assert kept.shape == (heads, budget)  # exactly the budget per head
    for head in range(heads):
        positions = kept[head].tolist()
        assert positions == sorted(set(positions))  # sorted and unique
        assert set(range(n - window, n)) <= set(positions)  # the window is always kept
        assert all(0 <= p < n for p in positions)
        # Every kept prefix position scores at least as high as every dropped one.
        pooled = pool_scores(scores[head], kernel, pooling)
        chosen = torch.zeros(n - window, dtype=torch.bool)
        chosen[[p for p in positions if p < n - window]] = True
        assert pooled[chosen].min() >= pooled[~chosen].max()


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=1e-6, max_value=1.0), st.integers(1, 100_000))
def test_ratio_budget_is_a_ceiling(ratio, n):
    budget = resolve_budget(ratio, n)
    assert 1 <= budget <= n
    assert budget >= ratio * n - 1e-6 and budget - 1 < ratio * n


@settings(max_examples=50, deadline=None)
@given(st.floats(min_value=0.0, max_value=0.999), st.integers(1, 100_000),
       st.sampled_from(["snapkv", "speckv", "pyramidkv", "specpc", "keep-last", "speckv-pc"]))
def test_compression_ratio_is_the_share_removed(ratio, n, name):
    """kvpress's compression_ratio r keeps what budget 1 - r keeps: at least (1 - r) of the prompt."""
    method = get_method(name, compression_ratio=ratio)
    assert method.budget == pytest.approx(1 - ratio)
    kept = resolve_budget(method.budget, n)
    assert kept >= (1 - ratio) * n - 1e-6 and kept - 1 < (1 - ratio) * n + 1e-6


def test_registry_has_the_foundation_methods():
    assert {"dense", "snapkv", "speckv"} <= set(METHODS)
    assert isinstance(get_method("SpecKV", budget=128), SpecKV)
    assert get_method(SpecKV(budget=128), window=16).window == 16


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"budget": 0}, "at least 1"),
        ({"budget": -5}, "at least 1"),
        ({"budget": 0.0}, r"\(0, 1\]"),
        ({"budget": 1.5}, r"\(0, 1\]"),
        ({"budget": "256"}, "token count"),
        ({"budget": True}, "token count"),
        ({"budget": 32, "window": 32}, "smaller than the budget"),
        ({"budget": 64, "window": 0}, "window"),
        ({"budget": 64, "kernel": 4}, "odd"),
        ({"budget": 64, "kernel": 0}, "odd"),
        ({"budget": 64, "pooling": "median"}, "max, avg"),
        ({"budget": 64, "reduction": "sum"}, "max, mean"),
        ({"budget": 64, "lookahead": 0}, "lookahead"),
    ],
)
def test_bad_parameters_fail_at_construction(params, message):
    with pytest.raises(ConfigError, match=message):
        get_method("speckv", **params)


def test_unknown_method_and_parameter():
    with pytest.raises(UnknownMethodError, match="available: dense, .*snapkv, .*speckv"):
        get_method("snapkvv")
    with pytest.raises(ConfigError, match="no parameter .budgett.; its parameters are: budget, .*window"):
        get_method("snapkv", budgett=64)
    with pytest.raises(ConfigError, match="'dense' has no parameter 'budget'"):
        get_method("dense", budget=64)


def test_ratio_budget_that_leaves_no_room_beyond_the_window():
    method = SnapKV(budget=0.1, window=32)
    assert method.kv_entries(1000) == 100
    with pytest.raises(PromptError, match="not more than the window"):
        method.kv_entries(200)
    with pytest.raises(PromptError, match="keeps 1 entries"):
        method.kv_entries(10)
    assert SnapKV(budget=1.0).kv_entries(10) == 10  # the whole prompt: runs dense, not an error


def test_speckv_lookahead_defaults_to_answer_length_capped():
    assert SpecKV(budget=64).draft_lookahead(20) == 20
    assert SpecKV(budget=64, max_lookahead=8).draft_lookahead(20) == 8
    assert SpecKV(budget=64, lookahead=5).draft_lookahead(20) == 5
    assert SnapKV(budget=64).draft_lookahead(20) == 0


def test_ties_go_to_the_earlier_position():
    # Max pooling makes plateaus; the entries kept at a plateau's edge must not depend on the device.
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.5, 0.2, 0.5, 0.0, 0.0]])
    (kept,) = SnapKV(budget=4, window=2, kernel=1).keep_positions([scores[:, :6]], 8, 4)
    assert kept.tolist() == [[1, 2, 6, 7]]
    (kept,) = SnapKV(budget=5, window=2, kernel=1, allocation="ada", alpha=0.0).keep_positions([scores[:, :6]], 8, 5)
    assert kept.tolist() == [[1, 2, 3, 6, 7]]
