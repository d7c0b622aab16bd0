"""Shared fixtures: tiny target/draft pairs of two families, built from configs."""

from __future__ import annotations

import pytest
import torch
from tiny import make_model, make_tokenizer

from draftkv.models import pair_from_models


def tiny_pair(family: str = "qwen2", *, draft: bool = True, max_positions: int = 4096):
    tokenizer = make_tokenizer()
    target = make_model(family, layers=3, seed=0, max_positions=max_positions)
    draft_model = make_model(family, layers=2, hidden=32, seed=1, max_positions=max_positions) if draft else None
    return pair_from_models(target, tokenizer, draft_model, tokenizer if draft else None)


@pytest.fixture(scope="session", params=["qwen2", "llama"])
def pair(request):
    return tiny_pair(request.param)


@pytest.fixture(scope="session")
def qwen_pair():
    return tiny_pair("qwen2")


def assert_same_result(together, alone) -> None:
    """A result from a batch or a shared run equals the one-request run: tokens, KV kept, lookahead."""
    assert together.token_ids == alone.token_ids
    assert together.stats.kv_entries == alone.stats.kv_entries
    assert together.stats.lookahead_tokens == alone.stats.lookahead_tokens
    if alone.kept_positions is None:
        assert together.kept_positions is None
    else:
        for a, b in zip(together.kept_positions, alone.kept_positions, strict=True):
            assert torch.equal(a, b)


@pytest.fixture
def calls_cost_as_measured(monkeypatch):
    """A device whose calls take what the pair's measured costs say: `auto`'s timings of a decode's own
    calls are those figures (tiny models' real calls cost about the same whatever they read)."""
    from draftkv.engine.speculation import AutoProposals

    real = AutoProposals.timed

    def timed(self, width, target_seconds, proposals, draft_seconds):
        real(self, width, self.device.target_call(width), proposals, proposals * self.device.draft_step)

    monkeypatch.setattr(AutoProposals, "timed", timed)
