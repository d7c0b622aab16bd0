"""The request flow on tiny models: the invariants of ALGORITHMS.md for dense, SnapKV and SpecKV,
batching, sampling, stop strings, streaming and bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_result, tiny_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import long_context

from draftkv.api import generate, generate_batch, prepare_batch
from draftkv.engine import scoring
from draftkv.engine.attention import RowSlot
from draftkv.engine.cache import kv_bytes
from draftkv.errors import ConfigError, PromptError, UnknownMethodError
from draftkv.flow.batch import left_padded
from draftkv.prompt import encode_prompt, encode_prompts
from draftkv.types import Request, Sampling

CONTEXT = long_context(260)
QUESTION = "what is the magic number?"
KV_METHODS = ["snapkv", "speckv", "h2o", "streamingllm", "laq"]
# Each method's "always kept" part, sized for tiny prompts.
KEPT_ALWAYS = {"snapkv": {"window": 8}, "speckv": {"window": 8}, "h2o": {"window": 8}, "streamingllm": {"sink": 4},
               "laq": {"window": 8}}


def prompt_length(pair, context=CONTEXT, question=QUESTION) -> int:
    return len(encode_prompt(pair.tokenizer, Request(context=context, question=question)).ids)


def dense_prefill(pair, request: Request):
    ids = torch.tensor([encode_prompt(pair.tokenizer, request).ids])
    with torch.inference_mode():
        return pair.target.model(input_ids=ids, use_cache=True).past_key_values


def test_a_batch_is_encoded_as_each_request_alone(qwen_pair):
    tokenizer = qwen_pair.tokenizer
    requests = [Request(context=CONTEXT, question=QUESTION),
                Request(context="short notes", question=QUESTION, chat_template=False),
                Request(context=CONTEXT[:300], question="", answer_prefix="The number is"),
                Request(messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": QUESTION}]),
                Request(context=CONTEXT[:90], question=QUESTION, chat_template=False, system="ignored")]
    together = encode_prompts(tokenizer, requests)
    for request, prompt in zip(requests, together, strict=True):
        alone = encode_prompt(tokenizer, request)
        assert prompt == alone
        special = not request.chat_template
        assert prompt.ids == tokenizer(prompt.text, add_special_tokens=special)["input_ids"]
        begin, end = prompt.content
        last = request.messages[-1]["content"] if request.messages else request.question or request.context
        assert prompt.text[begin:end].endswith(last)
        if request.question:
            assert tokenizer.decode(prompt.ids[prompt.question_start:]).lstrip().startswith(QUESTION)


@pytest.mark.parametrize("method", [*KV_METHODS, "pyramidkv", "ada-snapkv", "ada-speckv"])
def test_budget_at_least_prompt_is_dense(pair, method):
    n = prompt_length(pair)
    dense = generate(pair, CONTEXT, QUESTION, method="dense", max_new_tokens=16)
    for budget in (n, n + 50, 1.0):
        result = generate(pair, CONTEXT, QUESTION, method=method, budget=budget, max_new_tokens=16)
        assert result.token_ids == dense.token_ids
        assert not result.stats.compressed and "ran dense" in result.stats.note
        assert result.stats.kv_bytes == dense.stats.kv_bytes_dense
        assert result.stats.lookahead_tokens == 0  # no draft pass when nothing is compressed


@pytest.mark.parametrize("method", KV_METHODS)
def test_kept_entries_are_the_dense_entries_bitwise(pair, method):
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=8)
    prepared = prepare_batch(pair, [request], method, budget=64, **KEPT_ALWAYS[method])
    dense = dense_prefill(pair, request)
    kept_rows = prepared.kept_rows[0]
    assert kept_rows is not None
    for layer, (compressed, full, kept) in enumerate(zip(prepared.cache.layers, dense.layers, kept_rows, strict=True)):
        index = kept[None, :, :, None].expand(-1, -1, -1, full.keys.shape[-1])
        # A checked guess's accepted tokens follow the kept entries (generated tokens, outside the budget).
        assert compressed.keys.shape[2] == kept.shape[-1] + accepted_entries(prepared)
        assert torch.equal(compressed.keys[:, :, : kept.shape[-1]], full.keys.gather(2, index)), \
            f"keys differ in layer {layer}"
        assert torch.equal(compressed.values[:, :, : kept.shape[-1]], full.values.gather(2, index)), \
            f"values differ in layer {layer}"


def accepted_entries(prepared, row: int = 0) -> int:
    """Entries a checked guess added after the kept ones: its accepted tokens but the last (fed next)."""
    accepted = prepared.accepted[row]
    return len(accepted.token_ids) - 1 if accepted is not None else 0


@pytest.mark.parametrize("method", KV_METHODS)
@pytest.mark.parametrize("budget", [40, 0.3])
def test_cache_holds_exactly_the_budget_with_window_and_no_probe(pair, method, budget):
    n = prompt_length(pair)
    always = {"window": 16} if method != "streamingllm" else {"sink": 4}
    prepared = prepare_batch(pair, [Request(context=CONTEXT, question=QUESTION, max_new_tokens=12)], method,
                             budget=budget, **always)
    expected = budget if isinstance(budget, int) else -(-int(budget * 1000) * n // 1000)
    window = always.get("window", expected - 4)  # StreamingLLM keeps the last budget - sink tokens
    assert prepared.kv_budgets == [expected]
    config = pair.target.model.config
    extra = accepted_entries(prepared)
    for layer, kept in zip(prepared.cache.layers, prepared.kept_rows[0], strict=True):
        assert layer.keys.shape == (1, config.num_key_value_heads, expected + extra,
                                    config.hidden_size // config.num_attention_heads)
        for head in kept.tolist():
            assert head == sorted(set(head)) and len(head) == expected
            assert set(range(n - window, n)) <= set(head)
            assert max(head) < n  # the draft's lookahead never stays in the cache
            if method == "streamingllm":
                assert head == [0, 1, 2, 3, *range(n - window, n)]
    assert kv_bytes(prepared.cache) == (expected + extra) * prepared.target.entry_bytes
    assert prepared.target.stored_bytes == expected * prepared.target.entry_bytes
    if method == "speckv":
        assert prepared.draft is not None and prepared.draft.lengths[0] > 0


@pytest.mark.parametrize("method", [*KV_METHODS, "pyramidkv", "ada-snapkv", "ada-speckv"])
def test_decoding_continues_at_the_original_positions(qwen_pair, method):
    n = prompt_length(qwen_pair)
    seen = []

    def record(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            seen.append(kwargs["position_ids"].flatten().tolist())

    handle = qwen_pair.target.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = generate(qwen_pair, CONTEXT, QUESTION, method=method, budget=48, max_new_tokens=6)
    finally:
        handle.remove()
    assert result.stats.kv_entries == 48
    # A checked guess's accepted tokens are in the cache already: decoding goes on after them.
    accepted = result.stats.accepted_guess_tokens
    calls = len(result.token_ids) - 1 - accepted
    decode_steps = seen[-calls:] if calls > 0 else []
    assert decode_steps == [[n + accepted + step] for step in range(calls)]


def test_compressed_stats_measure_the_cache(qwen_pair):
    n = prompt_length(qwen_pair)
    result = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=8)
    stats = result.stats
    assert stats.compressed and stats.kv_entries == 64 and stats.prompt_tokens == n
    assert stats.kv_bytes * n == stats.kv_bytes_dense * 64
    assert {"tokenize", "draft_prefill", "draft_lookahead", "target_prefill", "probe", "scoring", "compression",
            "decode"} <= set(stats.timings)
    assert 0 < stats.time_to_first_token <= stats.total_time
    assert 0 < stats.lookahead_tokens <= 8
    assert "speckv" in stats.summary() and "KV" in stats.summary()


def eager_reference_scores(pair, ids: list[int], lookahead: list[int], window: int) -> list[torch.Tensor]:
    """Window importance from the eager attention matrices: rows = window + lookahead queries."""
    model = pair.target.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([ids + lookahead]), output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    n = len(ids)
    group = model.config.num_attention_heads // model.config.num_key_value_heads
    scores = []
    for attention in out.attentions:  # [1, H_q, T, T]
        rows = attention[0, :, n - window:, : n - window]
        scores.append(rows.reshape(model.config.num_key_value_heads, group * rows.shape[1], -1).amax(dim=1))
    return scores


def test_speckv_scores_match_the_eager_attention_of_window_and_lookahead(qwen_pair):
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=10)
    prepared = prepare_batch(qwen_pair, [request], "speckv", budget=64, window=8)
    ids = encode_prompt(qwen_pair.tokenizer, request).ids
    lookahead = prepared.draft.lookahead_ids[0, : prepared.draft.lengths[0]].tolist()
    assert lookahead, "the draft produced no lookahead tokens"
    reference = eager_reference_scores(qwen_pair, ids, lookahead, window=8)
    for got, expected in zip(prepared.layer_scores, reference, strict=True):
        torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-6)
    # SnapKV is the same primitive without the lookahead rows.
    snap = prepare_batch(qwen_pair, [request], "snapkv", budget=64, window=8)
    snap_reference = eager_reference_scores(qwen_pair, ids, [], window=8)
    for got, expected in zip(snap.layer_scores, snap_reference, strict=True):
        torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-6)


def test_speckv_runs_the_draft_once_and_snapkv_never(qwen_pair):
    calls = []
    handle = qwen_pair.draft.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        generate(qwen_pair, CONTEXT, QUESTION, method="snapkv", budget=64, max_new_tokens=4)
        assert calls == []
        result = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=4, lookahead=5)
    finally:
        handle.remove()
    assert result.stats.lookahead_tokens <= 5
    assert len(calls) == result.stats.lookahead_tokens  # one prefill + one step per further token


def test_decode_steps_run_without_cudnn_attention(qwen_pair):
    # cuDNN attention plans every new shape, and each decode step has a new key length (H100: ~6x
    # slower per step). The flag is process-wide, so it can be checked on a CPU too.
    seen = []
    hooks = [model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        (kwargs["input_ids"].shape[1], torch.backends.cuda.cudnn_sdp_enabled())), with_kwargs=True)
        for model in (qwen_pair.target.model, qwen_pair.draft.model)]
    try:
        generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=4, lookahead=4)
    finally:
        for hook in hooks:
            hook.remove()
    steps = [cudnn for width, cudnn in seen if width == 1]
    assert len(steps) >= 3 + 3  # the draft's lookahead steps and the target's decode steps
    assert not any(steps)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # and the setting is the caller's again afterwards


@pytest.mark.parametrize("method,params", [("dense", {}), ("snapkv", {"budget": 48}), ("speckv", {"budget": 48}),
                                           ("speckv", {"budget": 0.4, "window": 4}), ("h2o", {"budget": 48}),
                                           ("streamingllm", {"budget": 48})])
def test_batch_equals_one_by_one(pair, method, params):
    requests = [
        Request(context=long_context(260, seed=2), question=QUESTION, max_new_tokens=10),
        Request(context=long_context(150, seed=3), question="who is on monday?", max_new_tokens=6),
        Request(context="short one", question="what?", max_new_tokens=8),  # shorter than the budget: dense
        Request(context=long_context(200, seed=4), question=QUESTION, max_new_tokens=10, stop=("zulu",)),
    ]
    batched = generate_batch(pair, requests, method, **params)
    for request, together in zip(requests, batched, strict=True):
        alone = generate_batch(pair, [request], method, **params)[0]
        assert_same_result(together, alone)
        assert together.text == alone.text and together.finish_reason == alone.finish_reason


@pytest.mark.parametrize("method,params", [("speckv", {"budget": 48, "window": 8, "reduction": "mean"}),
                                           ("h2o", {"budget": 48, "window": 8}),
                                           ("specpc", {"budget": 60, "window": 16, "kernel": 7, "neighbourhood": 8,
                                                       "start_layer": 0, "head_reduction": "mean"})])
def test_a_padded_batch_is_prefilled_one_row_at_a_time(qwen_pair, method, params):
    # Left-padded rows read together need a [B, 1, N, N] mask: no flash kernel, and gigabytes at 32k.
    # So no prefill call may see padding, and each row's scores must be those of the row alone.
    requests = [Request(context=long_context(260, seed=2), question=QUESTION, max_new_tokens=6),
                Request(context=long_context(150, seed=3), question="who is on monday?", max_new_tokens=6)]
    calls = []
    hooks = [model.register_forward_pre_hook(lambda module, args, kwargs: calls.append(
        (tuple(kwargs["input_ids"].shape), kwargs.get("attention_mask"))), with_kwargs=True)
        for model in (qwen_pair.target.model, qwen_pair.draft.model)]
    try:
        together = prepare_batch(qwen_pair, requests, method, **params)
    finally:
        for hook in hooks:
            hook.remove()
    prefills = [shape for shape, mask in calls if shape[1] > 40 and mask is None]  # lookahead and decode are short
    # The draft's two rows, then the target's (SpecPC's target reads 60 tokens of each row: no padding).
    expected = {"speckv": [(1, 283), (1, 172)] * 2, "h2o": [(1, 283), (1, 172)],
                "specpc": [(1, 283), (1, 172), (2, 60)]}[method]
    assert prefills == expected
    assert all(mask is None for shape, mask in calls if shape[1] > 40)
    batch = together.batch if method != "specpc" else None
    for row, request in enumerate(requests):
        alone = prepare_batch(qwen_pair, [request], method, **params)
        if together.layer_scores is not None:
            for got, expected in zip(together.layer_scores, alone.layer_scores, strict=True):
                torch.testing.assert_close(got[row, :, batch.pad(row):], expected[0], rtol=1e-5, atol=1e-7)
        if together.draft is not None and together.draft.token_scores is not None:
            width = alone.draft.token_scores.shape[1]
            torch.testing.assert_close(together.draft.token_scores[row, -width:], alone.draft.token_scores[0],
                                       rtol=1e-5, atol=1e-7)
        assert together.kept_rows[row] is None or all(
            torch.equal(a, b) for a, b in zip(together.kept_rows[row], alone.kept_rows[0], strict=True))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, 9), min_size=1, max_size=5), st.integers(1, 3))
def test_rows_land_at_their_own_columns(lengths, heads):
    # The row-by-row prefill's two placements: a row's cache at the right end of the batch's (zeros
    # before it, where the mask hides them), and a row's scores at the columns after its padding.
    rows = [torch.rand(1, heads, n, 2) + 1 for n in lengths]
    stacked = left_padded(rows, dim=2)
    width = max(lengths)
    assert stacked.shape == (len(lengths), heads, width, 2)
    for index, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        assert torch.equal(stacked[index, :, width - n:], row[0])
        assert not stacked[index, :, : width - n].any()
        scores = torch.rand(1, heads, n) + 1
        widened = RowSlot(index, width - n, len(lengths)).widen(scores, width)
        assert torch.equal(widened[index, :, width - n:], scores[0])
        assert widened.count_nonzero() == scores.numel()  # nothing anywhere else


def test_sampling_is_deterministic_with_a_seed(qwen_pair):
    def sample(seed, **kwargs):
        return generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=20,
                        temperature=1.0, seed=seed, **kwargs).token_ids

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=20).token_ids
    assert sample(7, top_k=1) == greedy  # top-k 1 is greedy whatever the seed
    assert sample(3, top_p=1e-6) == greedy  # so is a vanishing nucleus
    requests = [Request(context=CONTEXT, question=QUESTION, max_new_tokens=12, sampling=Sampling(0.8, 0.9, 0, s))
                for s in (1, 2)]
    batched = generate_batch(qwen_pair, requests, "snapkv", budget=64)
    for request, together in zip(requests, batched, strict=True):
        assert together.token_ids == generate_batch(qwen_pair, [request], "snapkv", budget=64)[0].token_ids


def test_stop_strings_and_streaming(qwen_pair):
    full = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=24)
    assert len(full.text) > 6
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    pieces: list[str] = []
    stopped = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=24,
                       stop=[stop], on_text=pieces.append)
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[: full.text.index(stop)]
    assert "".join(pieces) == stopped.text
    streamed: list[str] = []
    again = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=24,
                     on_text=streamed.append)
    assert "".join(streamed) == again.text == full.text and len(streamed) > 1


def test_eos_stops_generation(qwen_pair):
    model = qwen_pair.target.model
    full = generate(qwen_pair, CONTEXT, QUESTION, max_new_tokens=10)
    eos = full.token_ids[3]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        stopped = generate(qwen_pair, CONTEXT, QUESTION, max_new_tokens=10)
    finally:
        model.generation_config.eos_token_id = saved
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == full.token_ids[: full.token_ids.index(eos)]


def test_bad_input_gets_a_clear_error(qwen_pair):
    with pytest.raises(PromptError, match="empty"):
        generate(qwen_pair, "", "  ", method="speckv", budget=64)
    with pytest.raises(UnknownMethodError, match="available"):
        generate(qwen_pair, CONTEXT, QUESTION, method="magic")
    with pytest.raises(ConfigError, match="no parameter 'budgett'"):
        generate(qwen_pair, CONTEXT, QUESTION, method="snapkv", budgett=3)
    with pytest.raises(ConfigError, match="max_new_tokens"):
        generate(qwen_pair, CONTEXT, QUESTION, max_new_tokens=0)
    with pytest.raises(ConfigError, match="window"):
        generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=16, window=32)
    with pytest.raises(ConfigError, match="odd"):
        generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, kernel=6)
    short = tiny_pair("qwen2", max_positions=128)
    with pytest.raises(PromptError, match="context limit of 128"):
        generate(short, CONTEXT, QUESTION, method="speckv", budget=64)
    no_draft = tiny_pair("qwen2", draft=False)
    with pytest.raises(ConfigError, match="needs a draft model"):
        generate(no_draft, CONTEXT, QUESTION, method="speckv", budget=64)
    assert generate(no_draft, CONTEXT, QUESTION, method="snapkv", budget=64).stats.compressed


def test_chunked_scoring_changes_nothing(qwen_pair, monkeypatch):
    whole = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=8)
    monkeypatch.setattr(scoring, "_MAX_PROBABILITY_BYTES", 4 * 4 * 400 * 5)
    chunked = generate(qwen_pair, CONTEXT, QUESTION, method="speckv", budget=64, max_new_tokens=8)
    assert chunked.token_ids == whole.token_ids
    for a, b in zip(chunked.kept_positions, whole.kept_positions, strict=True):
        assert torch.equal(a, b)


def test_h2o_scores_are_the_column_means_of_all_prompt_queries(qwen_pair, monkeypatch):
    request = Request(context=CONTEXT, question=QUESTION, max_new_tokens=4)
    monkeypatch.setattr(scoring, "_MAX_PROBABILITY_BYTES", 4 * 4 * 400 * 16)  # chunks of 16 queries
    prepared = prepare_batch(qwen_pair, [request], "h2o", budget=64, window=8)
    ids = encode_prompt(qwen_pair.tokenizer, request).ids
    model = qwen_pair.target.model
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            attentions = model(input_ids=torch.tensor([ids]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")
    n, kv_heads = len(ids), model.config.num_key_value_heads
    for got, attention in zip(prepared.layer_scores, attentions, strict=True):
        columns = attention[0, :, :, : n - 8].reshape(kv_heads, -1, n - 8).mean(dim=1)  # over heads and queries
        torch.testing.assert_close(got[0], columns, rtol=1e-4, atol=1e-6)


def test_laq_pseudo_answer_comes_from_the_stage_one_cache(qwen_pair):
    n = prompt_length(qwen_pair)
    snap = generate(qwen_pair, CONTEXT, QUESTION, method="snapkv", budget=64, window=32, max_new_tokens=8)
    calls = []

    def record(_module, _args, kwargs):
        calls.append((kwargs["input_ids"][0].tolist(), kwargs["cache"].get_seq_length()))

    handle = qwen_pair.target.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = generate(qwen_pair, CONTEXT, QUESTION, method="laq", budget=64, window=8, max_new_tokens=4)
    finally:
        handle.remove()
    assert calls[0][1] == 0 and len(calls[0][0]) == n  # the prompt prefill
    pseudo = snap.token_ids[:8]
    steps = calls[1: len(pseudo)]  # the pseudo-answer's decode steps run on the 64-entry stage-one copy
    assert [cache for _, cache in steps] == [64 + t for t in range(len(steps))]
    probe_ids, probe_cache = calls[len(pseudo)]
    assert probe_ids == pseudo and probe_cache == n  # the pseudo-answer then probes the full cache
    assert result.stats.kv_entries == 64 and "pseudo_answer" in result.stats.timings
