"""Prompt compression: SpecPC, SpecPrefill, LLMLingua-style, truncation and the SpecKV-PC cascade."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import long_context

from draftkv.api import compress_batch, generate, generate_batch
from draftkv.compress import compress_prompt
from draftkv.engine.scoring import pool_scores
from draftkv.errors import ConfigError, PromptError, TokenizerMismatchError
from draftkv.flow import steps
from draftkv.flow.batch import pad_prompts
from draftkv.flow.plan import DraftNeed
from draftkv.flow.steps import Clock, run_draft
from draftkv.methods import KeepEnds, KeepLast, Lingua, SelfInformation, SpecPC, SpecPrefill, get_method
from draftkv.methods.specpc import nearest_first_offsets, select_with_neighbourhoods
from draftkv.prompt import encode_prompt
from draftkv.types import Request

CONTEXT = long_context(300)
QUESTION = "what is the magic number?"
SMALL = {"window": 16, "kernel": 7, "neighbourhood": 8, "start_layer": 0}  # SpecPC sized for tiny prompts
PROMPT_METHODS = [("specpc", SMALL), ("specprefill", {}), ("lingua", {}), ("keep-last", {}), ("keep-ends", {}),
                  ("speckv-pc", {"prompt_window": 16, "prompt_kernel": 7, "neighbourhood": 8, "start_layer": 0,
                                 "window": 8})]


def prompt_ids(pair, context=CONTEXT, question=QUESTION) -> list[int]:
    return encode_prompt(pair.tokenizer, Request(context=context, question=question)).ids


def test_neighbourhood_offsets_are_nearest_first():
    assert nearest_first_offsets(5).tolist() == [0, -1, 1, -2, 2]
    assert nearest_first_offsets(1).tolist() == [0]


def test_specpc_selection_by_hand():
    scores = torch.zeros(20)
    scores[5] = 1.0  # one peak
    scores[12] = 0.5  # a lower one
    kept = select_with_neighbourhoods(scores, 9, window=2, kernel=1, pooling="max", neighbourhood=3)
    # window 18, 19; then 5 and its nearest neighbours 4, 6; then 12, 11, 13; then the next best (ties: lowest index)
    assert kept.tolist() == [0, 4, 5, 6, 11, 12, 13, 18, 19]
    with_sink = select_with_neighbourhoods(scores, 9, window=2, kernel=1, pooling="max", neighbourhood=3, sink=2)
    assert with_sink.tolist() == [0, 1, 4, 5, 6, 11, 12, 18, 19]


@settings(max_examples=80, deadline=None)
@given(st.integers(20, 300), st.integers(0, 10_000), st.sampled_from([1, 3, 7, 15]), st.integers(1, 16),
       st.integers(0, 12), st.integers(0, 4), st.data())
def test_specpc_selection_invariants(n, seed, kernel, neighbourhood, window, sink, data):
    budget = data.draw(st.integers(window + sink + 1, n))
    scores = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    kept = select_with_neighbourhoods(scores, budget, window=window, kernel=kernel, pooling="max",
                                      neighbourhood=neighbourhood, sink=sink)
    positions = kept.tolist()
    assert len(positions) == budget  # exactly C
    assert positions == sorted(set(positions))  # sorted, no duplicates
    assert set(range(n - window, n)) | set(range(sink)) <= set(positions)  # window (and sinks) always kept
    best = int(pool_scores(scores, kernel, "max").argmax())
    if budget >= window + sink + neighbourhood:
        # the best position comes with its nearest neighbours
        expected = {best + int(o) for o in nearest_first_offsets(neighbourhood) if 0 <= best + int(o) < n}
        assert expected <= set(positions)


def test_specprefill_tokens_and_chunks():
    scores = torch.arange(40, dtype=torch.float).flip(0)  # earlier tokens score higher
    tokens = SpecPrefill(budget=10, kernel=1).keep_tokens(list(range(40)), 40, 10, scores)
    assert tokens.tolist() == [*range(9), 39]  # the last token (the window) and the 9 best
    chunks = SpecPrefill(budget=10, kernel=1, chunk=4).keep_tokens(list(range(40)), 40, 10, scores)
    assert chunks.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 39]  # whole best chunks, cut to exactly C


def test_truncation_baselines():
    ids = list(range(50))
    assert KeepLast(budget=10).keep_tokens(ids, 50, 10, None).tolist() == list(range(40, 50))
    assert KeepEnds(budget=10).keep_tokens(ids, 50, 10, None).tolist() == [0, 1, 2, 3, 4, 45, 46, 47, 48, 49]
    assert KeepEnds(budget=10, head=2).keep_tokens(ids, 50, 10, None).tolist() == [0, 1, *range(42, 50)]


@pytest.mark.parametrize("chunk_positions", [None, 7])
def test_lingua_keeps_question_tail_and_most_surprising(qwen_pair, monkeypatch, chunk_positions):
    if chunk_positions is not None:  # LM-head chunks of 7 positions: every chunk boundary is crossed
        monkeypatch.setattr(steps, "_LM_HEAD_CHUNK", chunk_positions * qwen_pair.draft.model.config.vocab_size)
    request = Request(context=CONTEXT, question=QUESTION)
    prompt = encode_prompt(qwen_pair.tokenizer, request)
    batch = pad_prompts([prompt.ids], 0, torch.device("cpu"))
    with torch.inference_mode():
        view = run_draft(qwen_pair.draft.model, batch, [DraftNeed([0], SelfInformation())], set(), 0,
                         Clock(torch.device("cpu")))[0]
        information = view.token_scores[0]
        logits = qwen_pair.draft.model(input_ids=batch.input_ids).logits[0]
    expected = -torch.log_softmax(logits[:-1].float(), -1).gather(-1, batch.input_ids[0, 1:, None])[:, 0]
    torch.testing.assert_close(information[1:], expected, rtol=1e-4, atol=1e-4)
    assert information[0] == float("inf")

    kept = Lingua(budget=120, window=8).keep_tokens(prompt.ids, prompt.question_start, 120, information)
    n = len(prompt.ids)
    assert len(kept) == 120 and set(range(prompt.question_start, n)) <= set(kept.tolist())
    dropped = sorted(set(range(n)) - set(kept.tolist()))
    free = [p for p in kept.tolist() if p < prompt.question_start]
    assert information[free].min() >= information[dropped].max()


@pytest.mark.parametrize(("method", "params"), PROMPT_METHODS)
def test_budget_at_least_prompt_is_dense(qwen_pair, method, params):
    n = len(prompt_ids(qwen_pair))
    dense = generate(qwen_pair, CONTEXT, QUESTION, method="dense", max_new_tokens=12)
    budget_params = {"prompt_budget": n, "budget": n} if method == "speckv-pc" else {"budget": n}
    result = generate(qwen_pair, CONTEXT, QUESTION, method=method, max_new_tokens=12, **params, **budget_params)
    assert result.token_ids == dense.token_ids
    assert not result.stats.compressed and result.kept_tokens is None
    assert result.stats.lookahead_tokens == 0 and "draft_prefill" not in result.stats.timings


@pytest.mark.parametrize(("method", "params"), PROMPT_METHODS)
@pytest.mark.parametrize("positions", ["renumbered", "original"])
def test_target_reads_only_the_kept_tokens(qwen_pair, method, params, positions):
    ids = prompt_ids(qwen_pair)
    budget = {"prompt_budget": 120, "budget": 48} if method == "speckv-pc" else {"budget": 120}
    seen = []
    hook = qwen_pair.target.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append((kwargs["input_ids"].clone(), kwargs["position_ids"].clone())),
        with_kwargs=True)
    try:
        result = generate(qwen_pair, CONTEXT, QUESTION, method=method, max_new_tokens=6, positions=positions,
                          **params, **budget)
    finally:
        hook.remove()
    kept = result.kept_tokens.tolist()
    assert len(kept) == 120 == result.stats.kept_prompt_tokens and kept == sorted(set(kept))
    prefill_ids, prefill_positions = seen[0]
    assert prefill_ids[0].tolist() == [ids[p] for p in kept]  # the target only ever saw the kept tokens
    expected_positions = kept if positions == "original" else list(range(120))
    assert prefill_positions[0].tolist() == expected_positions
    decode_positions = [p[0].item() for i, p in seen[1:] if i.shape[1] == 1]
    first = len(ids) if positions == "original" else 120
    assert decode_positions == list(range(first, first + len(decode_positions)))
    if method == "speckv-pc":
        assert result.stats.kv_entries == 48 and result.stats.compressed
        for layer in result.kept_positions:  # KV positions reported in the original prompt's positions
            assert set(layer.flatten().tolist()) <= set(kept)


def test_cascade_runs_the_draft_once(qwen_pair):
    prefills = []
    hook = qwen_pair.draft.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: prefills.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    try:
        result = generate(qwen_pair, CONTEXT, QUESTION, method="speckv-pc", budget=48, prompt_budget=120,
                          max_new_tokens=6, prompt_window=16, prompt_kernel=7, neighbourhood=8, start_layer=0)
    finally:
        hook.remove()
    assert sum(1 for length in prefills if length > 1) == 1  # one draft prefill for both stations
    assert result.stats.lookahead_tokens > 0
    assert len(prefills) == 1 + result.stats.lookahead_tokens  # each lookahead token fed once (its attention counts)


def eager_draft_scores(pair, ids, lookahead, *, window, start_layer, weighted):
    model = pair.draft.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attentions = model(input_ids=torch.tensor([ids + lookahead]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    n = len(ids)
    weights = torch.linspace(0, 1, window) if weighted else torch.ones(window)
    steps = []
    prefill = [(a[0, :, n - window:n, :n] * weights[None, :, None]).amax(dim=(0, 1)) for a in attentions[start_layer:]]
    steps.append(torch.stack(prefill).amax(0))
    for t in range(len(lookahead)):
        steps.append(torch.stack([a[0, :, n + t, :n].amax(0) for a in attentions[start_layer:]]).amax(0))
    return torch.stack(steps).amax(0)


def test_specpc_draft_scores_match_eager_attention(qwen_pair):
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=4)
    stage = compress_batch(qwen_pair, [request], "specpc", budget=120, window=16, kernel=7, neighbourhood=8,
                           start_layer=1, lookahead=3)
    ids = stage.prompts[0].ids
    lookahead = stage.draft.lookahead_ids[0, : stage.draft.lengths[0]].tolist()
    assert len(lookahead) == 3
    expected = eager_draft_scores(qwen_pair, ids, lookahead, window=16, start_layer=1, weighted=True)
    torch.testing.assert_close(stage.draft.token_scores[0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("method", "params"), [("specpc", SMALL), ("speckv-pc", PROMPT_METHODS[-1][1]),
                                                ("lingua", {}), ("specprefill", {"chunk": 8})])
def test_batch_equals_one_by_one(qwen_pair, method, params):
    budget = {"prompt_budget": 100, "budget": 40} if method == "speckv-pc" else {"budget": 100}
    requests = [Request(context=long_context(260, seed=5), question=QUESTION, max_new_tokens=8),
                Request(context=long_context(120, seed=6), question="who?", max_new_tokens=5),
                Request(context="tiny", question="what?", max_new_tokens=6)]
    batched = generate_batch(qwen_pair, requests, method, **params, **budget)
    for request, together in zip(requests, batched, strict=True):
        alone = generate_batch(qwen_pair, [request], method, **params, **budget)[0]
        assert together.token_ids == alone.token_ids
        assert (together.kept_tokens is None) == (alone.kept_tokens is None)
        if alone.kept_tokens is not None:
            assert torch.equal(together.kept_tokens, alone.kept_tokens)


def test_compress_prompt_gives_text_ids_and_spans(qwen_pair):
    compressed = compress_prompt(qwen_pair, CONTEXT, QUESTION, method="specpc", budget=120, **SMALL)
    ids = prompt_ids(qwen_pair)
    assert compressed.kept_tokens == 120 and compressed.prompt_tokens == len(ids)
    assert compressed.token_ids == [ids[p] for p in compressed.kept_positions]
    content = f"{CONTEXT}\n\n{QUESTION}"
    assert compressed.text == "".join(content[a:b] for a, b in compressed.spans)
    assert compressed.text.endswith(QUESTION)  # the window holds the question
    assert all(b <= c for (_, b), (c, _) in zip(compressed.spans, compressed.spans[1:], strict=False))
    assert 0 < compressed.ratio < 1 and "kept 120" in compressed.summary()
    with pytest.raises(ConfigError, match="does not compress prompts"):
        compress_prompt(qwen_pair, CONTEXT, QUESTION, method="speckv")


@pytest.mark.parametrize(
    ("method", "params", "error", "message"),
    [
        ("specpc", {"budget": 64, "window": 64}, ConfigError, "smaller than the budget"),
        ("specpc", {"budget": 100, "kernel": 8}, ConfigError, "odd"),
        ("specpc", {"budget": 100, "neighbourhood": 0}, ConfigError, "neighbourhood"),
        ("specpc", {"budget": 100, "positions": "shifted"}, ConfigError, "renumbered, original"),
        ("specpc", {"budget": 100, "head_reduction": "sum"}, ConfigError, "max, mean"),
        ("keep-ends", {"budget": 10, "head": 11}, ConfigError, "head"),
        ("speckv-pc", {"budget": 512, "prompt_budget": 256}, ConfigError, "must not exceed the prompt budget"),
        ("speckv-pc", {"prompt_budget": 0}, ConfigError, "prompt_budget"),
    ],
)
def test_bad_configs(method, params, error, message):
    with pytest.raises(error, match=message):
        get_method(method, **params)


def test_start_layer_beyond_the_draft(qwen_pair):
    with pytest.raises(ConfigError, match="start_layer is 8 but the draft has 2 layers"):
        generate(qwen_pair, CONTEXT, QUESTION, method="specpc", budget=120, start_layer=8)


def test_kernel_or_neighbourhood_larger_than_the_prompt(qwen_pair):
    with pytest.raises(PromptError, match="must not be larger than the prompt"):
        generate(qwen_pair, "a b c d e f g h i j k l", "what?", method="specpc", budget=30, window=4,
                 kernel=63, neighbourhood=64, start_layer=0)
    with pytest.raises(PromptError, match="not more than the window"):
        SpecPC(budget=0.1, window=64).prompt_tokens(300)


def cross_tokenizer_pair():
    """A Qwen2 target and a Llama draft whose tokenizer was trained on another corpus."""
    from tiny import make_model, make_tokenizer

    from draftkv.models import pair_from_models

    target_tokenizer, draft_tokenizer = make_tokenizer(), make_tokenizer(vocab_size=420, seed=3)
    target = make_model("qwen2", layers=3)
    draft = make_model("llama", layers=2, hidden=32, seed=1, vocab_size=len(draft_tokenizer))
    with pytest.raises(TokenizerMismatchError, match="allow_tokenizer_mismatch"):
        pair_from_models(target, target_tokenizer, draft, draft_tokenizer)
    return pair_from_models(target, target_tokenizer, draft, draft_tokenizer, allow_tokenizer_mismatch=True)


@pytest.mark.parametrize(("method", "params"), [("specpc", SMALL), ("specprefill", {}), ("lingua", {})])
def test_prompt_methods_cross_tokenizers_as_text(method, params):
    pair = cross_tokenizer_pair()
    assert pair.draft.tokenizer.encode(CONTEXT[:200]) != pair.tokenizer.encode(CONTEXT[:200])
    compressed = compress_prompt(pair, CONTEXT, QUESTION, method=method, budget=120, **params)
    content = f"{CONTEXT}\n\n{QUESTION}"
    assert compressed.text == "".join(content[a:b] for a, b in compressed.spans) and compressed.spans
    if method != "specprefill":  # its window is the last token, in the chat template's tail
        assert compressed.text.endswith("?")  # the window (lingua: the question) holds the end of the question
    retold = encode_prompt(pair.tokenizer, Request(messages=[{"role": "user", "content": compressed.text}]))
    assert compressed.token_ids == retold.ids  # the target's own tokens of the kept text, in its template
    assert 80 <= compressed.kept_tokens <= 160  # the budget is scaled to the draft's tokens: close to 120

    seen = []
    hook = pair.target.model.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True)
    try:
        result = generate(pair, CONTEXT, QUESTION, method=method, budget=120, max_new_tokens=5, **params)
    finally:
        hook.remove()
    assert seen[0] == retold.ids
    assert result.stats.compressed and result.stats.kept_prompt_tokens == len(retold.ids)


def test_speckv_refuses_a_draft_with_another_tokenizer():
    pair = cross_tokenizer_pair()
    with pytest.raises(TokenizerMismatchError, match="same tokenizer"):
        generate(pair, CONTEXT, QUESTION, method="speckv", budget=64)
    with pytest.raises(TokenizerMismatchError, match="same tokenizer"):
        generate(pair, CONTEXT, QUESTION, method="speckv-pc", budget=48, prompt_budget=120)
    assert generate(pair, CONTEXT, QUESTION, method="snapkv", budget=64).stats.compressed  # needs no draft


@pytest.mark.parametrize(("layers", "expected"), [(2, 0), (9, 3)])
def test_specpc_scores_from_a_third_of_the_way_down_any_draft(layers, expected):
    """The paper's first scoring layer is 8 of 24: by default a draft of any depth starts a third of the way down."""
    from tiny import make_model, make_tokenizer

    from draftkv.models import pair_from_models

    tokenizer = make_tokenizer()
    pair = pair_from_models(make_model("qwen2", layers=3, seed=0), tokenizer,
                            make_model("qwen2", layers=layers, hidden=32, seed=1), tokenizer)
    params = {"budget": 120, "window": 16, "kernel": 7, "neighbourhood": 8}

    def kept(**extra) -> list[int]:
        return compress_prompt(pair, CONTEXT, QUESTION, method="specpc", **params, **extra).kept_positions

    assert kept() == kept(start_layer=expected)
    assert kept() != kept(start_layer=layers - 1)  # the layer matters here, so the default was really applied
