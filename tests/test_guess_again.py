"""Correct and re-guess (`verify_rounds`): where the target's check of the draft's guess stops, its own token
there corrects the guess, the draft guesses the rest again from the corrected beginning, and the target checks
that over its full cache, round after round. Greedy: the answer's first tokens, chosen over the full cache,
are dense's, and more of them with more rounds; a batch gives each row its lone answer."""

from __future__ import annotations

import dataclasses

import pytest
from test_checked_guess import near_pair, requests

from draftkv.errors import ConfigError
from draftkv.flow import run
from draftkv.methods import get_method


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def far(request):
    """A draft that drifts from the target soon: its guesses are refused early, so rounds have work."""
    return near_pair(request.param, noise=0.2)


def method(name: str = "speckv", **given):
    return get_method(name, budget=48, window=8, **given)


@pytest.mark.parametrize("name", ["speckv", "ada-speckv", "speckv-pc"])
def test_the_first_tokens_of_every_round_are_dense_ones(far, name):
    chosen = {"speckv-pc": dict(prompt_budget=160, prompt_window=8)}.get(name, {})
    # The full cache is the prompt the target read: all of it, or SpecKV-PC's kept prompt, uncut.
    full = get_method("speckv-pc", budget=160, window=8, **chosen) if chosen else get_method("dense")
    for request in requests(3, new_tokens=24):
        dense = run(far, [request], [full])[0][0]
        once = run(far, [request], [method(name, **chosen)])[0][0]
        again = run(far, [request], [method(name, verify_rounds=4, **chosen)])[0][0]
        first = again.stats.full_cache_tokens
        assert again.token_ids[:first] == dense.token_ids[:first]  # chosen over the full cache: dense's
        assert first >= once.stats.full_cache_tokens
        assert again.stats.guess_rounds <= 4 and once.stats.guess_rounds == 0


def test_rounds_correct_a_guess_wrong_from_its_first_token(far):
    checked = []
    for request in requests(4, new_tokens=24):
        once = run(far, [request], [method()])[0][0]
        if once.stats.accepted_guess_tokens == 0:  # the check refused the guess's first token
            again = run(far, [request], [method(verify_rounds=4)])[0][0]
            assert again.stats.guess_rounds >= 1 and again.stats.full_cache_tokens > 1
            checked.append(again)
    assert checked, "pick requests whose first guessed token the target refuses"


def test_a_batch_whose_rows_need_different_rounds_gives_each_row_its_lone_answer(far):
    asked = requests(3, new_tokens=20)
    chosen = method(verify_rounds=3)
    together = run(far, asked, [chosen])[0]
    alone = [run(far, [request], [chosen])[0][0] for request in asked]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({r.stats.guess_rounds for r in alone}) > 1 or len({r.stats.full_cache_tokens for r in alone}) > 1


def test_verify_rounds_is_checked():
    with pytest.raises(ConfigError, match="verify_rounds must be"):
        method(verify_rounds=-1)
    with pytest.raises(ConfigError, match="needs verify_lookahead=true"):
        method(verify_rounds=2, verify_lookahead=False)


def test_sampled_rounds_are_seeded_and_batch_as_alone(far):
    from draftkv.types import Sampling

    asked = [dataclasses.replace(request, sampling=Sampling(0.8, seed=seed))
             for seed, request in enumerate(requests(3, new_tokens=16))]
    chosen = method(verify_rounds=3)
    alone = [run(far, [request], [chosen])[0][0] for request in asked]
    assert [run(far, [request], [chosen])[0][0].token_ids for request in asked] == [r.token_ids for r in alone]
    assert [r.token_ids for r in run(far, asked, [chosen])[0]] == [r.token_ids for r in alone]
    assert any(r.stats.guess_rounds for r in alone)
