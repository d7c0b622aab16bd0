"""Shared fixtures: tiny target/draft pairs of two families, built from configs."""

from __future__ import annotations

import pytest
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
