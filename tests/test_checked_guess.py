"""The checked guess: the target's reading of a guess starts the answer with what it agrees with.

Greedy: every accepted token is the target's own greedy token given the cache it read; a batch
gives what each request gives alone, with either decode step; a guess agreed with entirely is the
answer with no decode step over the compressed cache. Sampling: the accept/resample rule gives the
target's distribution, in closed form and by a seeded Monte Carlo check on a tiny model's logits.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import assert_same_result
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import long_context, make_model, make_tokenizer

from draftkv import Request
from draftkv.engine.decoding import sampling_probs
from draftkv.engine.speculation import acceptance, check_guess, residual
from draftkv.flow import finish, prepare, run
from draftkv.likelihood import score_continuations
from draftkv.methods import get_method
from draftkv.models import pair_from_models
from draftkv.types import Sampling

CHECKED = ["speckv", "ada-speckv", "laq"]  # their guesses are read over the full (dense) cache


def near_pair(family: str, decode: str = "auto", noise: float = 0.02):
    """A draft that is the target with a little noise in its last MLP: it agrees with the target for a
    while, then not, so guesses are accepted in part."""
    tokenizer = make_tokenizer()
    target = make_model(family, layers=3, seed=0)
    draft = copy.deepcopy(target)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for weight in draft.model.layers[-1].mlp.parameters():
            weight.add_(torch.randn(weight.shape, generator=generator) * noise)
    return pair_from_models(target, tokenizer, draft, tokenizer, decode=decode)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def near(request):
    return near_pair(request.param)


def requests(count: int = 4, new_tokens: int = 16) -> list[Request]:
    return [Request(context=long_context(150 + 40 * seed, seed=seed), question="What?", max_new_tokens=new_tokens)
            for seed in range(count)]


def method(name: str, **given_params):
    return get_method(name, budget=48, window=8, **given_params)


@pytest.mark.parametrize("name", CHECKED)
def test_accepted_tokens_are_the_targets_greedy_tokens_over_the_full_cache(near, name):
    accepted_counts = []
    for request in requests():
        dense, checked = (results[0] for results in run(near, [request], ["dense", method(name)]))
        accepted = checked.stats.accepted_guess_tokens
        accepted_counts.append(accepted)
        # The accepted guess tokens and the target's own token after them are what dense says.
        assert checked.token_ids[: accepted + 1] == dense.token_ids[: accepted + 1]
        assert accepted <= checked.stats.lookahead_tokens or name == "laq"
    if name != "laq":  # the draft's guesses are accepted in part somewhere, so the check above has teeth
        assert any(0 < count < 16 for count in accepted_counts), accepted_counts


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_verify_lookahead_off_is_the_papers_method(family):
    same = near_pair(family, noise=0.0)
    request = requests(1)[0]
    off = run(same, [request], [method("speckv", verify_lookahead=False)])[0][0]
    on = run(same, [request], [method("speckv")])[0][0]
    assert off.stats.accepted_guess_tokens == 0 and on.stats.accepted_guess_tokens == 16
    assert off.stats.kv_entries == on.stats.kv_entries == 48  # accepted tokens are generated, outside the budget
    prepared = prepare(same, [request], [method("speckv", verify_lookahead=False)])[0]
    assert all(layer.keys.shape[2] == 48 for layer in prepared.cache.layers)


@pytest.mark.parametrize("decode", ["eager", "static"])
@pytest.mark.parametrize("name", ["speckv", "ada-speckv", "laq", "speckv-pc"])
def test_a_batch_gives_what_each_request_gives_alone(near, name, decode):
    pair = dataclasses.replace(near, decode=decode)
    chosen = method(name, prompt_budget=160) if name == "speckv-pc" else method(name)
    batch = requests(2)
    together = run(pair, batch, [chosen])[0]
    for row, request in enumerate(batch):
        alone = run(pair, [request], [chosen])[0][0]
        assert_same_result(together[row], alone)
        assert together[row].stats.accepted_guess_tokens == alone.stats.accepted_guess_tokens


def test_several_methods_decoded_together_give_their_own_results(near):
    chosen = [method("speckv"), method("ada-speckv"), method("laq"), "dense"]
    batch = requests(2)
    together = run(near, batch, chosen, decode_together=True)
    apart = run(near, batch, chosen)
    for mine, theirs in zip(together, apart, strict=True):
        for a, b in zip(mine, theirs, strict=True):
            assert_same_result(a, b)
            assert a.stats.accepted_guess_tokens == b.stats.accepted_guess_tokens


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_a_guess_agreed_with_entirely_is_the_answer_without_decode_steps(family):
    same = near_pair(family, noise=0.0)  # the draft is the target: its greedy guess is dense's answer
    request = requests(1, new_tokens=12)[0]
    dense = run(same, [request], ["dense"])[0][0]
    prepared = prepare(same, [request], [method("speckv")])[0]
    calls = []
    handle = same.target.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        checked = finish(same, prepared)[0]
    finally:
        handle.remove()
    assert checked.token_ids == dense.token_ids
    assert checked.stats.accepted_guess_tokens == 12
    assert calls == []  # not one decode step over the compressed cache


def test_accepted_tokens_stream_and_carry_their_logprobs():
    same = near_pair("qwen2", noise=0.0)
    request = dataclasses.replace(requests(1, new_tokens=10)[0], logprobs=3)
    chosen = method("speckv", lookahead=4)  # 4 accepted, then the decode goes on over the compressed cache
    pieces: list[str] = []
    dense = run(same, [request], ["dense"])[0][0]
    checked = run(same, [request], [chosen], on_text=lambda _row, text: pieces.append(text))[0][0]
    assert checked.stats.accepted_guess_tokens == 4
    assert "".join(pieces) == checked.text
    assert len(checked.logprobs) == len(checked.token_ids)
    for mine, theirs in zip(checked.logprobs[:5], dense.logprobs[:5], strict=True):
        assert mine.token_id == theirs.token_id
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)
        assert [token for token, _ in mine.top] == [token for token, _ in theirs.top]


def test_a_sampled_request_is_reproducible_with_its_seed(near):
    request = dataclasses.replace(requests(1)[0], sampling=Sampling(temperature=0.8, seed=7))
    first = run(near, [request], [method("speckv")])[0][0]
    again = run(near, [request], [method("speckv")])[0][0]
    assert first.token_ids == again.token_ids and len(first.token_ids) == 16


def test_a_likelihood_reads_the_compressed_context_without_a_checked_guess(near):
    context = near.tokenizer(long_context(200))["input_ids"]
    continuation = near.tokenizer(" alpha bravo charlie")["input_ids"]
    on, _ = score_continuations(near, context, [continuation], method("speckv"))
    off, _ = score_continuations(near, context, [continuation], method("speckv", verify_lookahead=False))
    assert on[0].logprobs == off[0].logprobs


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**31 - 1), st.booleans())
def test_accepting_or_resampling_gives_the_targets_distribution(vocab, seed, one_hot):
    """P(token) = q(x) * a(x) + (1 - sum_y q(y) a(y)) * r(x) equals p(x) for any p and q (closed form)."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * 3, dim=0)
    if one_hot:
        q = torch.zeros(vocab, dtype=torch.float64)
        q[int(torch.randint(vocab, (), generator=generator))] = 1
    else:
        q = torch.softmax(torch.randn(vocab, generator=generator, dtype=torch.float64) * 3, dim=0)
    kept = q * acceptance(p, q)
    assert torch.allclose(kept + (1 - kept.sum()) * residual(p, q), p, atol=1e-12)


@given(st.lists(st.integers(0, 9), min_size=0, max_size=6), st.integers(0, 2**31 - 1))
def test_greedy_check_keeps_the_agreeing_prefix_and_one_token_of_the_targets(guess, seed):
    logits = torch.randn(len(guess) + 1, 10, generator=torch.Generator().manual_seed(seed))
    choices = logits.argmax(dim=-1).tolist()
    tokens = check_guess(guess, logits, Sampling())
    kept = len(tokens) - 1
    assert tokens[:kept] == guess[:kept] == choices[:kept]
    assert tokens[kept] == choices[kept]
    assert kept == len(guess) or guess[kept] != choices[kept]


def test_sampled_check_draws_from_the_targets_distribution_on_a_tiny_model():
    """Monte Carlo: with a greedy guess (q one-hot), the first token and the second given the first
    follow the target's sampling distribution p (temperature and top-k applied)."""
    model = make_model("qwen2", layers=2, seed=3)
    ids = torch.tensor([make_tokenizer()(long_context(40))["input_ids"]])
    sampling = Sampling(temperature=1.0, top_k=4, seed=0)
    first_logits = model(input_ids=ids).logits[0, -1]
    guess = [int(first_logits.argmax())]
    with_guess = model(input_ids=torch.cat([ids, torch.tensor([guess])], dim=1)).logits[0, -2:]
    logits = with_guess.float()
    p_first, p_second = sampling_probs(logits[0], sampling), sampling_probs(logits[1], sampling)
    generator = torch.Generator().manual_seed(11)
    draws = [check_guess(guess, logits, sampling, generator) for _ in range(6000)]
    first = torch.bincount(torch.tensor([tokens[0] for tokens in draws]), minlength=p_first.numel()) / len(draws)
    assert 0.5 * float((first - p_first).abs().sum()) < 0.03
    seconds = [tokens[1] for tokens in draws if len(tokens) == 2]
    assert len(seconds) > 1000  # the guess was accepted often enough to check what follows it
    second = torch.bincount(torch.tensor(seconds), minlength=p_second.numel()) / len(seconds)
    assert 0.5 * float((second - p_second).abs().sum()) < 0.05
