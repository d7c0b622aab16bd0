"""Speculative decoding by the draft: greedy tokens equal the target's own decode for every method,
sampled tokens follow the target's distribution, and a decode that cannot speculate says why."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_checked_guess import near_pair, requests
from tiny import long_context, make_model, make_tokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import draftkv
from draftkv import METHODS
from draftkv.engine.attention import few_queries, stacked_sdpa
from draftkv.engine.cache import new_cache
from draftkv.engine.decoding import DecodeSpec, sampling_probs
from draftkv.engine.speculation import PLAIN_START, AutoProposals, CallCosts, Drafter, speculate
from draftkv.engine.static import StaticStep
from draftkv.errors import ConfigError
from draftkv.flow import run
from draftkv.flow.execute import speculation_asked
from draftkv.flow.plan import Consumer, LayerKinds
from draftkv.methods import budget_params, get_method
from draftkv.models import pair_from_models, parse_speculate
from draftkv.types import Request, Sampling


def with_budgets(name: str):
    method = get_method(name)
    params = budget_params(name, 48 if method.compresses_kv else None, 160 if method.compresses_prompt else None)
    if name in ("specpc", "specprefill", "speckv-pc"):
        params["window"] = 8
    return get_method(name, **params)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def near(request):
    return near_pair(request.param)


@pytest.mark.parametrize("name", list(METHODS))
def test_greedy_speculation_gives_the_tokens_of_a_decode_without(near, name):
    chosen = with_budgets(name)
    fast = dataclasses.replace(near, speculate=3)
    proposed = 0
    for request in requests(2):
        plain = run(near, [request], [chosen])[0][0]
        sped = run(fast, [request], [chosen])[0][0]
        assert sped.token_ids == plain.token_ids
        assert sped.text == plain.text
        assert sped.stats.accepted_proposals <= sped.stats.proposed_tokens
        proposed += sped.stats.proposed_tokens
    assert proposed > 0
    assert "draft_decode" in sped.stats.timings
    # A method whose draft pass guessed the answer goes on from that pass's cache; the others read the prompt
    # into the draft first.
    assert ("speculation_prefill" in sped.stats.timings) == (chosen.draft_lookahead(16) == 0)


def test_dense_speculation_accepts_proposals_and_saves_target_calls(near):
    fast = dataclasses.replace(near, speculate=4)
    request = requests(1, new_tokens=24)[0]
    calls = []
    handle = near.target.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        sped = run(fast, [request], ["dense"])[0][0]
    finally:
        handle.remove()
    assert sped.stats.accepted_proposals > 0
    # One prefill, then one call per round: fewer than one call per new token.
    assert len(calls) == 1 + sped.stats.speculation_rounds + (sped.stats.new_tokens - 1 - sped.stats.speculation_rounds
                                                              - sped.stats.accepted_proposals)
    assert len(calls) < sped.stats.new_tokens


def test_generate_takes_speculate_as_a_request_does(near):
    request = requests(1, new_tokens=24)[0]
    plain = draftkv.generate(near, request.context, request.question, max_new_tokens=24)
    sped = draftkv.generate(near, request.context, request.question, max_new_tokens=24, speculate=4)
    assert sped.token_ids == plain.token_ids and sped.stats.proposed_tokens > 0 == plain.stats.proposed_tokens
    with pytest.raises(ConfigError, match="speculate must be None, 'auto' or a whole number"):
        draftkv.generate(near, request.context, request.question, speculate=-1)


@pytest.mark.parametrize("name", ["dense", "snapkv", "speckv", "ada-speckv", "specpc"])
def test_a_batch_speculates_each_row_with_its_own_tokens(near, name):
    fast = dataclasses.replace(near, speculate=3)
    batch = requests(3)  # prompts of different lengths: a padded batch
    chosen = with_budgets(name)
    together = run(fast, batch, [chosen])[0]
    for row, request in enumerate(batch):
        alone = run(near, [request], [chosen])[0][0]
        assert together[row].token_ids == alone.token_ids
        assert together[row].stats.accepted_guess_tokens == alone.stats.accepted_guess_tokens
        assert together[row].stats.proposed_tokens > 0


def test_a_decode_that_cannot_speculate_decodes_without_and_says_why(near):
    fast = dataclasses.replace(near, speculate=3)
    batch = requests(2)
    evicting = run(fast, batch[:1], [get_method("snapkv", budget=48, window=8, evict_every=4)])[0][0]
    assert "without speculation: decode-time eviction" in evicting.stats.note
    alone = pair_from_models(near.target.model, near.tokenizer, speculate=3)  # no draft
    assert "without speculation: no draft" in run(alone, batch[:1], ["dense"])[0][0].stats.note


def test_speculation_streams_logprobs_and_stops_like_a_decode_without(near):
    fast = dataclasses.replace(near, speculate=3)
    request = dataclasses.replace(requests(1, new_tokens=20)[0], logprobs=2)
    plain = run(near, [request], ["dense"])[0][0]
    stop = plain.text[len(plain.text) // 2: len(plain.text) // 2 + 3]
    stopping = dataclasses.replace(request, stop=(stop,)) if stop.strip() else request
    pieces: list[str] = []
    sped = run(fast, [stopping], ["dense"], on_text=lambda _row, text: pieces.append(text))[0][0]
    again = run(near, [stopping], ["dense"])[0][0]
    assert sped.text == again.text and sped.finish_reason == again.finish_reason
    assert "".join(pieces) == sped.text
    assert [entry.token_id for entry in sped.logprobs] == [entry.token_id for entry in again.logprobs]
    for mine, theirs in zip(sped.logprobs, again.logprobs, strict=True):
        assert mine.logprob == pytest.approx(theirs.logprob, abs=1e-4)


def test_speculate_must_be_a_small_whole_number(near):
    for bad in (-1, 65, 1.5, True, "fast"):
        with pytest.raises(ConfigError, match="speculate must be"):
            pair_from_models(near.target.model, near.tokenizer, near.draft.model, speculate=bad)
        with pytest.raises(ConfigError, match="speculate must be None, 'auto' or a whole number"):
            Request(question="q", speculate=bad)
    assert pair_from_models(near.target.model, near.tokenizer, near.draft.model, speculate="auto").speculate == "auto"
    for text, value in [("auto", "auto"), (" 4", 4), ("0", 0)]:
        assert parse_speculate(text) == value
    with pytest.raises(ConfigError, match="or 'auto', got 'sometimes'"):
        parse_speculate("sometimes")
    with pytest.raises(ConfigError, match="draft_cache must be one of compressed, whole, window"):
        pair_from_models(near.target.model, near.tokenizer, near.draft.model, speculate=2, draft_cache="half")


def test_sampled_speculation_draws_from_the_targets_distribution():
    """Monte Carlo: the first two tokens of a sampled decode whose second token came through a sampled
    draft proposal have the target's joint distribution p(t0) p(t1 | t0), computed exactly."""
    tokenizer = make_tokenizer()
    target, draft = make_model("qwen2", layers=2, seed=3), make_model("qwen2", layers=2, seed=4)
    ids = tokenizer(long_context(30))["input_ids"]
    sampling = Sampling(temperature=1.0, top_k=3)
    prompt = torch.tensor([ids])
    first = target(input_ids=prompt).logits[0, -1]
    p_first = sampling_probs(first, sampling)
    exact = torch.zeros(p_first.numel(), p_first.numel())
    for t0 in p_first.nonzero().flatten().tolist():
        second = target(input_ids=torch.cat([prompt, torch.tensor([[t0]])], dim=1)).logits[0, -1]
        exact[t0] = p_first[t0] * sampling_probs(second, sampling)
    counts = torch.zeros_like(exact)
    runs = 600
    for seed in range(runs):
        caches = []
        for model in (target, draft):
            cache = new_cache(model.config)
            logits = model(input_ids=prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
            caches.append((cache, logits))
        spec = DecodeSpec([3], [dataclasses.replace(sampling, seed=seed)], [set()])
        output, speculated = speculate(target, caches[0][0], caches[0][1][None], [len(ids)], spec,
                                       Drafter(draft, caches[1][0], 2, [len(ids)], [0]))
        assert speculated[0].proposed == 1  # the second token came through the proposal's check
        t0, t1 = output.rows[0].token_ids[:2]
        counts[t0, t1] += 1
    assert 0.5 * float((counts / runs - exact).abs().sum()) < 0.1


def test_speculation_runs_from_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from draftkv.cli import app

    for bad in ("-1", "often"):
        result = CliRunner().invoke(app, ["generate", "--speculate", bad, "-q", "x", "--context", "y"])
        assert result.exit_code != 0 and "or 'auto'" in result.output
    result = CliRunner().invoke(app, ["bench", "--speculate", "0,auto,x", "--out", str(tmp_path / "b")])
    assert result.exit_code != 0 and "got 'x'" in result.output


@pytest.mark.parametrize("decode", ["eager", "static"])
def test_speculation_goes_on_from_the_draft_pass_after_either_decode_step(near, decode):
    """The eager step leaves the lookahead in the draft's cache (cut back to what the check kept); the
    static step reads the cache into its own slots and leaves the prompt alone: both go on correctly."""
    pair = dataclasses.replace(near, decode=decode)
    same = near_pair("qwen2", decode=decode, noise=0.0)  # a guess accepted whole: the draft's cache is all kept
    for chosen_pair in (pair, same):
        request = requests(1, new_tokens=20)[0]
        chosen = with_budgets("speckv")
        plain = run(chosen_pair, [request], [chosen])[0][0]
        sped = run(dataclasses.replace(chosen_pair, speculate=3), [request], [chosen])[0][0]
        assert sped.token_ids == plain.token_ids
        assert "speculation_prefill" not in sped.stats.timings


def test_the_draft_cache_bytes_reported_are_the_bytes_it_holds(near):
    config = near.draft.model.config
    per_entry = config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) \
        * 2 * near.draft.model.dtype.itemsize
    request = requests(1)[0]
    fast = dataclasses.replace(near, speculate=2)
    dense = run(fast, [request], ["dense"])[0][0]
    assert dense.stats.draft_kv_bytes == dense.stats.prompt_tokens * per_entry  # the prompt, read for speculation
    for how, kept in [("compressed", 48), ("window", 48), ("whole", dense.stats.prompt_tokens)]:
        snap = run(dataclasses.replace(fast, draft_cache=how), [request], [with_budgets("snapkv")])[0][0]
        assert snap.stats.draft_kv_bytes == kept * per_entry, how  # SnapKV's budget, or all of the prompt
        assert snap.token_ids == run(near, [request], [with_budgets("snapkv")])[0][0].token_ids
    checked = run(fast, [request], [with_budgets("speckv")])[0][0]
    # The draft pass's cache, cut to the budget: and the guess tokens the target kept (at most those it read).
    held = checked.stats.draft_kv_bytes // per_entry - 48
    assert checked.stats.draft_kv_bytes % per_entry == 0
    assert 0 <= held <= checked.stats.accepted_guess_tokens
    whole = run(dataclasses.replace(fast, draft_cache="whole"), [request], [with_budgets("speckv")])[0][0]
    assert whole.stats.draft_kv_bytes // per_entry - whole.stats.prompt_tokens == held



def test_the_draft_scores_its_own_cache_only_when_speculation_keeps_it_compressed():
    """Scoring the draft's cache costs an eager lookahead: the plan asks for it only where a compressed
    draft cache drops entries."""
    kinds = LayerKinds(full=True, sliding=False)

    def plan(how: str, length: int = 200, proposals: int = 3, name: str = "speckv") -> Consumer:
        return Consumer.of(with_budgets(name), [length], [16], kinds, True, proposals, kinds, how)

    assert plan("compressed").draft_scored and plan("compressed").need.scores_cache
    assert plan("compressed").rows[0].draft_budget == 48
    for unscored in (plan("whole"), plan("window"), plan("compressed", length=40), plan("compressed", proposals=0),
                     plan("compressed", name="dense")):
        assert not unscored.draft_scored and not unscored.need.scores_cache
    assert plan("compressed", length=40).rows[0].draft_budget is None  # the budget holds the whole prompt
    assert plan("window").rows[0].draft_budget == 48  # a window keeps the budget, unscored


def costs_of(one: float, per_extra: float, draft_step: float, acceptance: float) -> CallCosts:
    """Costs where a target call reading n tokens takes one + (n - 1) * per_extra seconds, at an acceptance
    rate held with a large weight."""
    costs = CallCosts({n: one + (n - 1) * per_extra for n in (1, 2, 3, 5, 9)}, draft_step)
    costs.accepted, costs.proposed = acceptance * 1e6, 1e6
    return costs


def test_auto_speculates_where_the_cost_model_says_it_decodes_faster():
    # A GPU-like device: a (k + 1)-token call costs about a 1-token call, a draft step a tenth of it.
    gpu = costs_of(0.030, 0.0005, 0.003, 0.7)
    assert gpu.best(8) >= 3 and gpu.gain(gpu.best(8)) > 1.5
    # The closed form: 4 proposals at a = 0.7 give (1 - 0.7^5) / 0.3 tokens for 4 draft steps and a 5-token call.
    assert gpu.gain(4) == pytest.approx((1 - 0.7 ** 5) / 0.3 * 0.030 / (4 * 0.003 + 0.032))
    # Costs like this CPU's for the embedded pair at 2k (598 ms for 1 token, 1,079 for 5, 1,391 for 9, 209 per
    # draft step; 2 and 3 tokens cost more than 5): no k gains at 70% acceptance, so auto decodes plainly.
    cpu = CallCosts({1: 0.598, 2: 1.2, 3: 1.15, 5: 1.079, 9: 1.391}, 0.209)
    assert cpu.best(8) == 0
    assert cpu.target_call(4) == pytest.approx((1.15 + 1.079) / 2)  # between the widths timed
    assert cpu.target_call(13) == pytest.approx(1.391 + 4 * (1.391 - 1.079) / 4)  # past them
    # A draft that is never right never pays; one that always is pays with the most proposals a flat cost allows.
    assert costs_of(0.030, 0.0005, 0.003, 0.0).best(8) == 0
    assert costs_of(0.030, 0.0, 0.0, 1.0).best(8) == 8
    cpu.checked(100, 100)  # the pair's acceptance moves with what it accepts
    assert cpu.acceptance == pytest.approx((0.7 * 8 + 100) / 108)


def test_auto_in_the_plan_speculates_with_measured_gains_and_says_why_not():
    kinds = LayerKinds(full=True, sliding=False)

    def plan(costs: CallCosts) -> Consumer:
        return Consumer.of(with_budgets("speckv"), [200], [16], kinds, True, "auto", kinds, "compressed", costs)

    fast = plan(costs_of(0.030, 0.0005, 0.003, 0.7))
    assert fast.speculation == 8 and fast.adapts and fast.speculation_note is None
    slow = plan(CallCosts({1: 0.598, 2: 1.2, 3: 1.15, 5: 1.079, 9: 1.391}, 0.209))
    assert slow.speculation == 0 and not slow.adapts
    assert slow.speculation_note.startswith("decoded without speculation: auto measured no gain (target call 598 ms")
    fixed = Consumer.of(with_budgets("speckv"), [200], [16], kinds, True, 3, kinds)
    assert fixed.speculation == 3 and not fixed.adapts


def decode_rounds(auto: AutoProposals, costs: dict[int, float], draft_step: float, rounds: int, left: int = 100,
                  filled: bool = True) -> list[int]:
    """What `auto` proposes over `rounds` rounds where this decode's calls take `costs` by width and a draft
    step `draft_step`, every proposal kept."""
    chosen = []
    for _ in range(rounds):
        count = auto.proposals(8, left, filled)
        chosen.append(count)
        auto.timed(count + 1, costs.get(count + 1, costs[1] * (count + 1)), count, count * draft_step)
        auto.device.checked(count, count)
        left -= count + 1
    return chosen


def test_auto_starts_plain_and_judges_by_the_decodes_own_calls():
    pair_costs = costs_of(0.030, 0.0005, 0.003, 0.9)
    # Where this decode's calls cost what the pair measured, it times plain calls first, then speculates.
    rounds = decode_rounds(AutoProposals(pair_costs), {n: 0.030 + (n - 1) * 0.0005 for n in range(1, 10)}, 0.003, 6)
    assert rounds[:PLAIN_START] == [0] * PLAIN_START and all(count >= 3 for count in rounds[PLAIN_START:])
    # Over a long cache its wide calls cost far more than the pair's timing over a short one said: once it has
    # timed one, it stops proposing.
    long_cache = {1: 0.040, **{n: 0.040 * n for n in range(2, 10)}}
    auto = AutoProposals(costs_of(0.030, 0.0005, 0.003, 0.9))
    rounds = decode_rounds(auto, long_cache, 0.003, 8)
    assert rounds[PLAIN_START] > 0 and rounds[PLAIN_START + 1:] == [0] * (8 - PLAIN_START - 1)
    # A width it has not timed is the pair's figure times how much dearer its own calls were, interpolated
    # between the widths it has timed.
    corrected = auto.costs()
    assert set(auto.target_seen) == {1, 9}
    assert corrected.target_call(1) == pytest.approx(0.040) and corrected.target_call(9) == pytest.approx(0.360)
    dearer = {width: corrected.target_call(width) / auto.device.target_call(width) for width in (1, 5, 9)}
    assert dearer[5] == pytest.approx((dearer[1] + dearer[9]) / 2)
    # The draft's step is what its proposing took.
    slow_draft = AutoProposals(costs_of(0.030, 0.0005, 0.003, 0.9))
    assert decode_rounds(slow_draft, {n: 0.030 for n in range(1, 10)}, 0.060, 5)[PLAIN_START + 1:] == [0, 0]
    assert slow_draft.costs().draft_step == pytest.approx(0.060)


def test_auto_speculates_only_where_the_saving_pays_for_the_drafts_reading_of_the_prompt():
    calls = {n: 0.030 + (n - 1) * 0.0005 for n in range(1, 10)}
    held = decode_rounds(AutoProposals(costs_of(0.030, 0.0005, 0.003, 0.9), fill_seconds=50.0), calls, 0.003, 4,
                         left=128, filled=True)
    assert held[PLAIN_START:] != [0, 0]  # the draft holds the prompt already: nothing more to pay
    for fill, left, speculates in [(0.5, 128, True), (50.0, 128, False), (0.5, 10, False)]:
        auto = AutoProposals(costs_of(0.030, 0.0005, 0.003, 0.9), fill_seconds=fill)
        rounds = decode_rounds(auto, calls, 0.003, 4, left=left, filled=False)
        assert any(rounds) == speculates
        assert (auto.declined is not None) == (not speculates)
    assert auto.declined.startswith("auto decoded without speculation: the draft would first read the prompt "
                                    "(about 0.5 s) to save about 0.")


def test_auto_in_a_decode_leaves_the_prompts_reading_out_where_it_does_not_pay(near, calls_cost_as_measured):
    """Costs at the scale of microseconds: any real prefill of the draft costs more than speculation saves.
    Dense would have the draft read the prompt first, so it decodes plainly and says why; SpecKV's draft
    holds the prompt from its pass, so it still speculates."""
    request = requests(1, new_tokens=24)[0]
    pair = dataclasses.replace(near, speculate="auto", call_costs=costs_of(1e-6, 1e-8, 1e-7, 0.9))
    dense = run(pair, [request], ["dense"])[0][0]
    assert dense.stats.proposed_tokens == 0 and "speculation_prefill" not in dense.stats.timings
    assert "auto decoded without speculation: the draft would first read the prompt" in dense.stats.note
    assert dense.token_ids == run(near, [request], ["dense"])[0][0].token_ids
    speckv = run(pair, [request], [with_budgets("speckv")])[0][0]
    assert speckv.stats.proposed_tokens > 0 and "auto decoded without" not in speckv.stats.note


def test_auto_gives_the_tokens_of_a_decode_without_and_measures_once(near, calls_cost_as_measured):
    request = requests(1, new_tokens=24)[0]
    plain = run(near, [request], ["dense"])[0][0]
    measured = dataclasses.replace(near, speculate="auto")
    first = run(measured, [request], ["dense"])[0][0]
    assert first.token_ids == plain.token_ids
    assert set(measured.call_costs.target) == {1, 2, 3, 5, 9}
    assert all(seconds > 0 for seconds in measured.call_costs.target.values()) and measured.call_costs.draft_step > 0
    assert "speculation_costs" in first.stats.timings
    again = run(measured, [request], ["dense"])[0][0]
    assert "speculation_costs" not in again.stats.timings  # timed once per pair
    for costs, speculates in [(costs_of(0.030, 0.0005, 0.003, 0.7), True), (costs_of(0.03, 0.03, 0.03, 0.7), False)]:
        pair = dataclasses.replace(near, speculate="auto", call_costs=costs)
        for chosen in ("dense", with_budgets("speckv")):
            sped = run(pair, [request], [chosen])[0][0]
            assert sped.token_ids == run(near, [request], [chosen])[0][0].token_ids
            assert (sped.stats.proposed_tokens > 0) == speculates
            assert ("auto measured no gain" in sped.stats.note) == (not speculates)
    # A padded batch decides for its rows together, and each row gets its own tokens.
    batch = requests(2, new_tokens=24)
    pair = dataclasses.replace(near, speculate="auto", call_costs=costs_of(0.030, 0.0005, 0.003, 0.7))
    for chosen in ("dense", with_budgets("speckv")):
        together = run(pair, batch, [chosen])[0]
        assert [r.token_ids for r in together] == [run(near, [one], [chosen])[0][0].token_ids for one in batch]
        assert all(r.stats.proposed_tokens > 0 for r in together)
    # A request's own value wins over the pair's; a batch with a fixed value and `auto` takes the fixed one.
    assert run(dataclasses.replace(near, speculate="auto", call_costs=costs_of(0.03, 0.03, 0.03, 0.7)),
               [dataclasses.replace(request, speculate=2)], ["dense"])[0][0].stats.proposed_tokens > 0
    assert speculation_asked(["auto", 3, 0]) == 3 and speculation_asked(["auto", 0]) == "auto"
    assert speculation_asked([0, 0]) == 0


def test_auto_adapts_to_a_draft_that_is_never_right(calls_cost_as_measured):
    """A draft with random weights of its own never agrees: after a few rounds the pair's acceptance
    falls, and the rest of the answer decodes without proposals (same tokens)."""
    far = near_pair("qwen2", noise=10.0)
    request = requests(1, new_tokens=40)[0]
    costs = costs_of(0.030, 0.0005, 0.003, 0.7)
    costs.accepted, costs.proposed = 0.7 * 8, 8.0  # the prior's weight
    sped = run(dataclasses.replace(far, speculate="auto", call_costs=costs), [request], ["dense"])[0][0]
    assert sped.token_ids == run(far, [request], ["dense"])[0][0].token_ids
    assert 0 < sped.stats.proposed_tokens < 8 * 39 / 2
    assert costs.acceptance < 0.3


@pytest.mark.parametrize("name", ["dense", "snapkv", "speckv", "ada-speckv", "specpc"])
def test_the_static_step_speculates_with_the_tokens_of_the_eager_one(near, name, monkeypatch):
    """The static step reads k + 1 tokens into its fixed slots and takes the refused ones back (a batch, in
    step, frees them per row); on a CPU it runs uncaptured and must give the eager step's tokens, alone
    and in a padded batch, for both models. A batch always takes the static step."""
    widths = []
    real = StaticStep.read

    def spy(self, tokens, positions):
        widths.append(tokens.shape[1])
        return real(self, tokens, positions)

    monkeypatch.setattr(StaticStep, "read", spy)
    chosen = with_budgets(name)
    batch = requests(2)  # different lengths
    eager = [run(dataclasses.replace(near, speculate=3, decode="eager"), [request], [chosen])[0][0]
             for request in batch]
    assert not widths
    fixed = [run(dataclasses.replace(near, speculate=3, decode="static"), [request], [chosen])[0][0]
             for request in batch]
    assert 4 in widths and 1 in widths  # the target's checks of 3 proposals and the draft's steps
    widths.clear()
    together = run(dataclasses.replace(near, speculate=3, decode="eager"), batch, [chosen])[0]
    assert 4 in widths
    for row, request in enumerate(batch):
        plain = run(near, [request], [chosen])[0][0].token_ids
        assert fixed[row].token_ids == eager[row].token_ids == together[row].token_ids == plain
        assert fixed[row].stats.accepted_proposals == eager[row].stats.accepted_proposals
        assert together[row].stats.proposed_tokens > 0


def test_the_static_step_reads_several_tokens_and_takes_refused_ones_back(near):
    """Reading k + 1 tokens at once equals reading them one by one, and after taking tokens back the next
    read equals one over a cache that never had them."""
    model = near.target.model
    prompt = torch.arange(3, 40)[None]

    def prefilled():
        cache = new_cache(model.config)
        with torch.inference_mode():
            model(input_ids=prompt, cache=cache, use_cache=True)
        return cache

    step = StaticStep(model, prefilled(), None, 12)
    at = prompt.shape[1]
    together = step.read(torch.tensor([[5, 6, 7, 8]]), torch.arange(at, at + 4)[None])[0]
    single = StaticStep(model, prefilled(), None, 12)
    for offset, token in enumerate([5, 6, 7, 8]):
        one = single.read(torch.tensor([[token]]), torch.tensor([[at + offset]]))[0, -1]
        torch.testing.assert_close(together[offset], one, rtol=1e-4, atol=1e-4)
    step.take_back(2)  # 7 and 8 refused: 9 follows 6
    after = step.read(torch.tensor([[9]]), torch.tensor([[at + 2]]))[0, -1]
    fresh = StaticStep(model, prefilled(), None, 12)
    fresh.read(torch.tensor([[5, 6]]), torch.arange(at, at + 2)[None])
    torch.testing.assert_close(after, fresh.read(torch.tensor([[9]]), torch.tensor([[at + 2]]))[0, -1],
                               rtol=1e-4, atol=1e-4)


def test_finished_rows_leave_a_speculating_batch(near, monkeypatch):
    """Once half the rows are finished both models go on with the running rows alone (the static step's
    slots copied for them), and every row keeps the tokens it has alone."""
    held = []
    real = StaticStep.read

    def spy(self, tokens, positions):
        held.append(tokens.shape[0])
        return real(self, tokens, positions)

    monkeypatch.setattr(StaticStep, "read", spy)
    batch = [dataclasses.replace(request, max_new_tokens=new, ignore_eos=True)
             for request, new in zip(requests(3), (3, 5, 24), strict=True)]
    together = run(dataclasses.replace(near, speculate=3), batch, ["dense"])[0]
    assert held[0] == 3 and held[-1] == 1 and 2 not in held  # 3 rows, then the one left (2 <= 3 // 2 finished)
    for row, request in enumerate(batch):
        alone = run(near, [request], ["dense"])[0][0]
        assert together[row].token_ids == alone.token_ids
        assert len(together[row].token_ids) == request.max_new_tokens
    assert together[2].stats.proposed_tokens > together[0].stats.proposed_tokens


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 2), kv_heads=st.integers(1, 3), group=st.integers(2, 4), queries=st.integers(1, 16),
       cached=st.integers(1, 30), per_head=st.booleans(), seed=st.integers(0, 1000), masked=st.booleans())
def test_stacked_query_heads_attend_as_transformers_sdpa_does(batch, kv_heads, group, queries, cached, per_head, seed,
                                                              masked):
    """A few queries of grouped heads, stacked per KV head, give transformers' SDPA output for any mask
    it is given: shared by the heads or each head's own (a ragged cache's); one query needs none (a decode
    step over an unpadded cache)."""
    generator = torch.Generator().manual_seed(seed)
    heads, dim, keys = kv_heads * group, 8, cached + queries
    query = torch.randn(batch, heads, queries, dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, keys, dim, generator=generator) for _ in range(2))
    mask = torch.rand(batch, heads if per_head else 1, queries, keys, generator=generator) > 0.3
    mask |= torch.ones(queries, keys, dtype=torch.bool).tril(cached).logical_and(
        torch.arange(keys) >= cached)  # each query sees itself at least
    if queries == 1 and not masked:
        mask = None
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.is_causal = group, True
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=dim ** -0.5)
    stacked, _ = stacked_sdpa(module, query, key, value, mask, scaling=dim ** -0.5)
    assert stacked.shape == expected.shape == (batch, queries, heads, dim)
    torch.testing.assert_close(stacked, expected, atol=1e-5, rtol=1e-5)


def test_a_model_reading_a_few_tokens_over_its_cache_copies_no_keys(monkeypatch):
    """transformers copies each KV head once per query head (repeat_kv) for a masked call of several
    tokens; `few_queries` stacks the query heads instead, with the same logits, and only for the block."""
    import transformers.integrations.sdpa_attention as sdpa

    model = make_model("qwen2", heads=4, kv_heads=2)
    copies = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda states, n: copies.append(n) or real(states, n))
    prompt = torch.arange(3, 43)[None]

    def four_tokens_after_the_prompt() -> torch.Tensor:
        cache = new_cache(model.config)
        with torch.inference_mode():
            model(input_ids=prompt, cache=cache, use_cache=True)
            return model(input_ids=torch.tensor([[7, 8, 9, 10]]), position_ids=torch.arange(40, 44)[None],
                         cache=cache, use_cache=True).logits

    plain = four_tokens_after_the_prompt()
    assert copies  # transformers' own path copies
    copies.clear()
    with few_queries(model):
        stacked = four_tokens_after_the_prompt()
    assert not copies
    torch.testing.assert_close(stacked, plain, atol=1e-5, rtol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # as it was


@settings(max_examples=12, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.sampled_from([0.0, 0.7, 1.3]), st.integers(0, 2**31), st.sampled_from([0, 2, 3]),
                          st.integers(3, 12)), min_size=2, max_size=3))
def test_a_seeded_answer_is_the_same_alone_and_in_any_batch(rows):
    """Each row draws from its own generator, speculates with its own width and draws only for the proposals it
    reads: its answer does not depend on its neighbours (their speculation, lengths or temperatures)."""
    pair = near_pair("qwen2")
    asked = [Request(context=long_context(120 + 30 * at, seed=at), question="What?", max_new_tokens=new_tokens,
                     sampling=Sampling(temperature, seed=seed), speculate=width)
             for at, (temperature, seed, width, new_tokens) in enumerate(rows)]
    together = run(pair, asked, ["dense"])[0]
    for request, answer in zip(asked, together, strict=True):
        assert answer.token_ids == run(pair, [request], ["dense"])[0][0].token_ids
