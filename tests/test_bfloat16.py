"""Scores that hold in bfloat16 (ALGORITHMS.md, invariant 10): a bfloat16 model's queries, keys, hidden
states and logits are upcast before any importance score is computed, so what a method keeps does not
depend on the model's dtype beyond the rounding of the activations themselves."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import long_context, make_model, make_tokenizer

import draftkv
from draftkv.engine import scoring
from draftkv.models import pair_from_models

CONTEXT = long_context(260, seed=5)
QUESTION = "what is the magic number?"
# Every method that scores (the positional ones, keep-last, keep-ends and StreamingLLM, have no score).
SCORED = {"h2o": {"budget": 64}, "snapkv": {"budget": 64}, "pyramidkv": {"budget": 64}, "speckv": {"budget": 64},
          "ada-snapkv": {"budget": 64}, "ada-speckv": {"budget": 64}, "laq": {"budget": 64},
          "kvzip": {"budget": 64}, "keydiff": {"budget": 64}, "specpc": {"budget": 96, "kernel": 5, "start_layer": 0},
          "specprefill": {"budget": 96}, "lingua": {"budget": 96},
          "speckv-pc": {"budget": 48, "prompt_budget": 120, "kernel": 5, "start_layer": 0}}


@pytest.fixture(scope="module")
def bf16_pair():
    tokenizer = make_tokenizer()
    target = make_model("qwen2", layers=3, seed=0).to(torch.bfloat16)
    draft = make_model("qwen2", layers=2, hidden=32, seed=1).to(torch.bfloat16)
    return pair_from_models(target, tokenizer, draft, tokenizer)


def kept(pair, method: str) -> tuple[list[list[int]] | None, list[int] | None, list[int]]:
    result = draftkv.generate(pair, CONTEXT, QUESTION, method=method, max_new_tokens=6, **SCORED[method])
    assert result.stats.dtype == "bfloat16"
    positions = [layer.tolist() for layer in result.kept_positions] if result.kept_positions is not None else None
    tokens = result.kept_tokens.tolist() if result.kept_tokens is not None else None
    assert positions is not None or tokens is not None, method  # the method did drop something
    return positions, tokens, result.token_ids


@pytest.mark.parametrize("method", sorted(SCORED))
def test_what_a_bfloat16_model_keeps_equals_what_float64_scores_of_its_activations_keep(bf16_pair, method,
                                                                                       monkeypatch):
    as_run = kept(bf16_pair, method)
    monkeypatch.setattr(scoring, "SCORE_DTYPE", torch.float64)
    assert kept(bf16_pair, method) == as_run


def test_scores_in_bfloat16_would_flip_rankings(bf16_pair, monkeypatch):
    """The check above can fail: scored in the model's own bfloat16, some method keeps other entries."""
    as_run = {method: kept(bf16_pair, method) for method in ("snapkv", "speckv", "h2o", "kvzip", "keydiff")}
    monkeypatch.setattr(scoring, "SCORE_DTYPE", torch.bfloat16)
    assert any(kept(bf16_pair, method)[:2] != run[:2] for method, run in as_run.items())


def test_window_scores_of_bfloat16_activations_are_float32_and_upcast_first(monkeypatch):
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(1, 4, 8, 16, generator=generator).to(torch.bfloat16)
    key = torch.randn(1, 2, 200, 16, generator=generator).to(torch.bfloat16)
    scores = scoring.window_scores(query, key, prefix_length=192)
    assert scores.dtype == torch.float32
    monkeypatch.setattr(scoring, "SCORE_DTYPE", torch.float64)
    reference = scoring.window_scores(query, key, prefix_length=192)
    assert reference.dtype == torch.float64
    torch.testing.assert_close(scores.double(), reference, rtol=1e-5, atol=1e-7)


def test_a_bfloat16_pair_answers_like_its_float32_twin_at_full_budget():
    """Sanity of the bfloat16 path: a budget above the prompt keeps everything, in either dtype."""
    tokenizer = make_tokenizer()
    target = make_model("qwen2", layers=3, seed=0)
    draft = make_model("qwen2", layers=2, hidden=32, seed=1)
    pair = pair_from_models(copy.deepcopy(target).to(torch.bfloat16), tokenizer,
                            copy.deepcopy(draft).to(torch.bfloat16), tokenizer)
    dense = draftkv.generate(pair, CONTEXT, QUESTION, method="dense", max_new_tokens=6)
    whole = draftkv.generate(pair, CONTEXT, QUESTION, method="speckv", budget=4096, max_new_tokens=6)
    assert whole.token_ids == dense.token_ids and not whole.stats.compressed
    assert dense.stats.dtype == "bfloat16" and dense.stats.kv_bytes_dense * 2 == draftkv.generate(
        pair_from_models(target, tokenizer, draft, tokenizer), CONTEXT, QUESTION, method="dense",
        max_new_tokens=1).stats.kv_bytes_dense  # bfloat16 entries are half the bytes
