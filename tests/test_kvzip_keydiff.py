"""KVzip and KeyDiff: their scores against a direct computation, their budgets, batches and modes.

(Every family of the family matrix runs them too: tests/test_families.py iterates the registry.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_result, tiny_pair
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import long_context

import draftkv
from draftkv.engine.scoring import pool_scores
from draftkv.errors import ConfigError
from draftkv.flow import prepare
from draftkv.methods import get_method
from draftkv.prompt import encode_prompt
from draftkv.types import Request

REQUEST = Request(context=long_context(200, seed=5), question="what is the magic number?", max_new_tokens=6)


@pytest.fixture(scope="module")
def eager_pair():
    """A pair whose target runs eager attention, so it can hand out its attention weights."""
    pair = tiny_pair("qwen2")
    pair.target.model.config._attn_implementation = "eager"
    return pair


def probes(tokenizer, method, prompt) -> list[tuple[int, int, list[int]]]:
    """KVzip's probes, built here from its paragraph: per chunk of the user's content (the template's head
    and tail cut off), its start, end and tokens: the instruction (later: the hint and the previous chunk's
    last tokens), the template's end of turn and assistant header, the chunk."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "@@"}], tokenize=False,
                                             add_generation_prompt=True)
    tail = encode(rendered[rendered.index("@@") + 2:])
    begin, end = prompt.content_tokens()
    assert 0 < begin < end < len(prompt.ids)  # the template's head and tail are not repeated
    made = []
    for start in range(begin, end, method.chunk):
        stop = min(start + method.chunk, end)
        asked = encode(method.instruction) if start == begin else \
            encode(method.hint) + prompt.ids[max(begin, start - method.hint_tokens): start]
        made.append((start, stop, asked + tail + prompt.ids[start:stop]))
    return made


def reconstruction_attention(model, tokenizer, method, prompt, prefix: int) -> list:
    """Per layer [1, H_kv, prefix]: KVzip's scores read straight from the model's attention weights over
    prompt + probe: each probe query's weights renormalised over the first `sink` keys, its chunk's and the
    probe's own (a softmax over a subset of keys is the full softmax divided by the subset's sum), at the
    chunk's columns, the max over a group's query heads and the probe's queries."""
    config = model.config
    group = config.num_attention_heads // config.num_key_value_heads
    n = len(prompt.ids)
    best = None
    for start, stop, probe in probes(tokenizer, method, prompt):
        with torch.inference_mode():
            attentions = model(input_ids=torch.tensor([prompt.ids + probe]), output_attentions=True).attentions
        columns = list(range(min(method.sink, start))) + list(range(start, stop)) + list(range(n, n + len(probe)))
        layers = []
        for weights in attentions:  # [1, H_q, T, T]
            rows = weights[:, :, n:, columns].double()
            rows = rows / rows.sum(dim=-1, keepdim=True)
            chunk = rows[..., min(method.sink, start): min(method.sink, start) + stop - start].float()
            got = chunk.reshape(1, config.num_key_value_heads, group, len(probe), stop - start).amax(dim=(2, 3))
            layer = torch.zeros(1, config.num_key_value_heads, prefix)
            layer[..., start: min(stop, prefix)] = got[..., : max(min(stop, prefix) - start, 0)]
            layers.append(layer)
        best = layers if best is None else [torch.maximum(a, b) for a, b in zip(best, layers, strict=True)]
    return best


@pytest.mark.parametrize("chunk", [2048, 97])
def test_kvzip_scores_are_the_reconstruction_probes_maximum_attention(eager_pair, chunk):
    method = get_method("kvzip", budget=64, window=8, chunk=chunk)
    prepared = prepare(eager_pair, [REQUEST], [method])[0]
    prompt = prepared.prompts[0]
    assert len(prompt.ids) > 2 * 97  # the smaller chunk makes at least three probe calls
    expected = reconstruction_attention(eager_pair.target.model, eager_pair.tokenizer, method, prompt,
                                        len(prompt.ids) - 8)
    assert len(prepared.layer_scores) == len(expected) == 3
    for got, want in zip(prepared.layer_scores, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert "reconstruction" in prepared.clock.stages


def test_keydiff_scores_are_cosine_distances_from_the_mean_key(qwen_pair):
    method = get_method("keydiff", budget=64, window=8)
    prepared = prepare(qwen_pair, [REQUEST], [method])[0]
    dense = prepare(qwen_pair, [REQUEST], ["dense"])[0]
    n = len(prepared.prompts[0].ids)
    for got, layer in zip(prepared.layer_scores, dense.cache.layers, strict=True):
        keys = layer.keys[0].float()  # [H_kv, n, d]
        for head in range(keys.shape[0]):
            mean = keys[head].mean(dim=0)
            for position in (0, 5, n // 2, n - 9):
                key = keys[head, position]
                distance = 1 - torch.dot(key, mean) / (key.norm() * mean.norm())
                torch.testing.assert_close(got[0, head, position], distance, rtol=1e-4, atol=1e-5)
        assert got.shape[-1] == n - 8  # the window is kept, not scored


def test_keydiff_ignores_padding_in_the_mean(qwen_pair):
    """A row of a padded batch gets the scores it gets alone: its padding takes no part in the mean."""
    short = Request(context=long_context(120, seed=6), question="when is the launch?", max_new_tokens=6)
    both = prepare(qwen_pair, [REQUEST, short], [get_method("keydiff", budget=64, window=8)])[0]
    alone = prepare(qwen_pair, [short], [get_method("keydiff", budget=64, window=8)])[0]
    pad = both.batch.pad(1)
    for together, own in zip(both.layer_scores, alone.layer_scores, strict=True):
        torch.testing.assert_close(together[1, :, pad:], own[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["kvzip", "keydiff"])
def test_the_cache_keeps_exactly_the_budget_with_sinks_and_window(qwen_pair, method):
    n_layers = qwen_pair.target.model.config.num_hidden_layers
    for allocation in ("uniform", "global"):
        result = draftkv.generate(qwen_pair, REQUEST.context, REQUEST.question, method=method, budget=40, window=8,
                                  sink=4, allocation=allocation, max_new_tokens=6)
        n = result.stats.prompt_tokens
        assert result.stats.kv_entries == 40 and result.stats.compressed  # per head, on average
        heads = result.kept_positions[0].shape[0]
        assert sum(int((layer >= 0).sum()) for layer in result.kept_positions) == 40 * n_layers * heads
        for layer in result.kept_positions:  # [H_kv, K] per layer, -1 in a shorter head's empty slots
            if allocation == "uniform":
                assert layer.shape[-1] == 40 and bool((layer >= 0).all())
            for head in layer:
                kept = set(head.tolist())
                assert set(range(4)) <= kept and set(range(n - 8, n)) <= kept
    dense = draftkv.generate(qwen_pair, REQUEST.context, REQUEST.question, method="dense", max_new_tokens=6)
    whole = draftkv.generate(qwen_pair, REQUEST.context, REQUEST.question, method=method, budget=10_000,
                             max_new_tokens=6)
    assert whole.token_ids == dense.token_ids and not whole.stats.compressed
    assert "ran dense" in whole.stats.note


def test_kvzip_reports_its_reconstruction_and_keydiff_reads_nothing_more(qwen_pair):
    calls = []
    hook = qwen_pair.target.model.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                                            with_kwargs=True)
    try:
        kvzip = draftkv.generate(qwen_pair, REQUEST.context, REQUEST.question, method="kvzip", budget=40, chunk=64,
                                 max_new_tokens=6)
        prefill_and_probes = [c for c in calls if c > 1]
        calls.clear()
        keydiff = draftkv.generate(qwen_pair, REQUEST.context, REQUEST.question, method="keydiff", budget=40,
                                   max_new_tokens=6)
    finally:
        hook.remove()
    n = kvzip.stats.prompt_tokens
    begin, end = encode_prompt(qwen_pair.tokenizer, REQUEST).content_tokens()
    assert prefill_and_probes[0] == n and len(prefill_and_probes) == 1 + -(-(end - begin) // 64)  # then each chunk
    assert kvzip.stats.timings["reconstruction"] > 0
    assert [c for c in calls if c > 1] == [n] and "reconstruction" not in keydiff.stats.timings


@pytest.mark.parametrize("method", ["kvzip", "keydiff"])
def test_a_batch_equals_one_by_one_and_query_agnostic_mode_runs(pair, method):
    short = Request(context=long_context(120, seed=6), question="when is the launch?", max_new_tokens=6)
    together = draftkv.generate_batch(pair, [REQUEST, short], method, budget=40, window=8)
    for request, result in zip([REQUEST, short], together, strict=True):
        assert_same_result(result, draftkv.generate_batch(pair, [request], method, budget=40, window=8)[0])
    compressed = draftkv.compress_context(pair, REQUEST.context, method=method, budget=40, window=8)
    assert compressed.stats.kv_entries == 40
    first = compressed.ask(REQUEST.question, max_new_tokens=6)
    assert compressed.ask(REQUEST.question, max_new_tokens=6).token_ids == first.token_ids


@pytest.mark.parametrize("params", [{"budget": 12, "window": 8, "sink": 4}, {"chunk": 0}, {"sink": -1},
                                    {"hint_tokens": -1}, {"hint": 3}])
def test_bad_settings_are_refused(params):
    for name in ("kvzip", "keydiff"):
        if name == "keydiff" and params.keys() & {"chunk", "hint", "hint_tokens"}:
            continue
        with pytest.raises(ConfigError):
            get_method(name, **params)
    with pytest.raises(ConfigError, match="cannot score the cache while decoding"):
        get_method("kvzip", evict_every=4, allocation="uniform")
    assert get_method("keydiff", evict_every=4).evict_every == 4  # its scorer reads the cache while decoding


def test_keydiff_distance_orders_like_a_hand_computed_ranking():
    """The scorer alone: on made-up keys the most unusual key scores highest."""
    from draftkv.methods.keydiff import KeyDistance

    keys = torch.ones(1, 1, 6, 4)
    keys[0, 0, 3] = torch.tensor([-1.0, 1.0, -1.0, 1.0])

    class Reading:
        batch = type("Batch", (), {"attention_mask": None})()

        def full_layer_keys(self):
            return [keys]

    scores = KeyDistance(window=0).scores(None, Reading())[0]
    mean = keys[0, 0].mean(dim=0)
    expected = 1 - F.cosine_similarity(keys[0, 0], mean[None], dim=-1)
    torch.testing.assert_close(scores[0, 0], expected)
    assert int(scores[0, 0].argmax()) == 3


def test_two_budgets_of_kvzip_share_one_reconstruction_and_dense_does_not_pay_for_it(qwen_pair):
    from draftkv.flow import run

    calls = []
    hook = qwen_pair.target.model.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs["input_ids"].shape[1]),
                                                            with_kwargs=True)
    methods = [get_method("kvzip", budget=40, chunk=64), get_method("kvzip", budget=56, chunk=64), get_method("dense")]
    try:
        together = [r[0] for r in run(qwen_pair, [REQUEST], methods)]
    finally:
        hook.remove()
    n = together[0].stats.prompt_tokens
    made = probes(qwen_pair.tokenizer, methods[0], encode_prompt(qwen_pair.tokenizer, REQUEST))
    assert [c for c in calls if c > 1] == [n] + [len(probe) for _, _, probe in made]
    for method, result in zip(methods, together, strict=True):
        assert_same_result(result, draftkv.generate_batch(qwen_pair, [REQUEST], method)[0])
    assert together[0].stats.timings["reconstruction"] == together[1].stats.timings["reconstruction"] > 0
    assert "reconstruction" not in together[2].stats.timings


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["kvzip", "keydiff"]), st.integers(1, 4), st.integers(1, 12), st.integers(0, 6),
       st.integers(1, 40), st.integers(1, 120), st.sampled_from([1, 3]), st.integers(0, 10_000))
def test_sinks_window_and_best_scores_are_kept(name, heads, window, sink, extra, longer, kernel, seed):
    """Per head exactly the budget: the first `sink` and the last `window` positions always, and every
    other kept position scores (pooled) at least as high as every dropped one."""
    budget = window + sink + extra
    n = budget + longer
    method = get_method(name, budget=budget, window=window, sink=sink, kernel=kernel, allocation="uniform")
    scores = torch.rand(heads, n - window, generator=torch.Generator().manual_seed(seed))
    (kept,) = method.keep_positions([scores], n, budget)
    assert kept.shape == (heads, budget)
    for head in range(heads):
        positions = kept[head].tolist()
        assert positions == sorted(set(positions))
        assert set(range(sink)) | set(range(n - window, n)) <= set(positions)
        pooled = pool_scores(scores[head], kernel, "max")
        chosen = torch.zeros(n - window, dtype=torch.bool)
        chosen[[p for p in positions if sink <= p < n - window]] = True
        free = torch.ones(n - window, dtype=torch.bool)
        free[: sink + kernel // 2] = False  # the sinks' forced scores spread to their pooling neighbours
        rest, dropped = chosen & free, free & ~chosen
        if rest.any() and dropped.any():
            assert pooled[rest].min() >= pooled[dropped].max()
