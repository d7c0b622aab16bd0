"""The decode step seam: preallocated cache slots and mask, a replaceable step, incremental text."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny import long_context, make_tokenizer

from draftkv.api import generate_batch
from draftkv.engine.cache import SlotLayer
from draftkv.engine.decoding import DecodeSpec, EagerStep, IncrementalText, decode
from draftkv.flow import prepare
from draftkv.methods import get_method
from draftkv.types import Request

TOKENIZER = make_tokenizer()
SPECIAL = [TOKENIZER.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(0, len(TOKENIZER) - 1), st.sampled_from(SPECIAL)), max_size=40))
def test_incremental_text_is_the_whole_decode(ids):
    """Whatever the tokens (characters split over several byte tokens, special tokens), the text built a
    few tokens at a time is the decode of all of them, and each step's text extends the last."""
    text = IncrementalText(TOKENIZER)
    shown = ""
    for token in ids:
        now = text.add(token)
        assert now.startswith(shown)
        shown = now
    assert text.finish() == TOKENIZER.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_incremental_text_decodes_only_the_last_few_tokens(monkeypatch):
    decoded_lengths = []
    real = TOKENIZER.decode

    def counting(ids, *args, **kwargs):
        decoded_lengths.append(len(ids))
        return real(ids, *args, **kwargs)

    ids = TOKENIZER(long_context(400))["input_ids"]
    text = IncrementalText(TOKENIZER)
    monkeypatch.setattr(text.tokenizer, "decode", counting)
    for token in ids:
        text.add(token)
    assert text.finish() == real(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert len(ids) > 300 and max(decoded_lengths) <= 4  # not the whole answer every step


def forward_inputs(model, run):
    """`run()`'s result, and the attention mask and the first layer's key storage at each decoding step."""
    seen = []

    def record(_module, _args, kwargs):
        if kwargs["input_ids"].shape[1] == 1:
            layer = kwargs["cache"].layers[0]
            mask = kwargs.get("attention_mask")
            seen.append((mask.data_ptr() if mask is not None else None, type(layer),
                         layer.key_slots.data_ptr() if isinstance(layer, SlotLayer) else None))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        return run(), seen
    finally:
        hook.remove()


def test_a_decoding_step_writes_in_place(qwen_pair):
    """Rows of different lengths (a padded batch, so a mask): every step reads one preallocated mask and
    writes its keys into slots reserved once, for dense and a compressed cache alike."""
    requests = [Request(context=long_context(120, seed=5), question="what?", max_new_tokens=8, ignore_eos=True),
                Request(context=long_context(60, seed=6), question="who?", max_new_tokens=8, ignore_eos=True)]
    for method, params in (("dense", {}), ("snapkv", {"budget": 40, "window": 8})):
        results, seen = forward_inputs(qwen_pair.target.model,
                                       lambda m=method, p=params: generate_batch(qwen_pair, requests, m, **p))
        assert len(seen) == 7 and all(r.stats.new_tokens == 8 for r in results)
        assert {kind for _, kind, _ in seen} == {SlotLayer}
        assert len({slots for _, _, slots in seen}) == 1  # no copy of the cache per step
        masks = {mask for mask, _, _ in seen}
        # Dense: one buffer, read as a growing view. SnapKV cuts both rows to 40 entries: no padding, no mask.
        assert len(masks) == 1 and (None in masks) == (method == "snapkv")


def test_another_step_can_replace_the_eager_one(qwen_pair):
    """The seam a backend plugs into: a step with the same call gives the same tokens."""
    request = Request(context=long_context(150, seed=7), question="what?", max_new_tokens=10, ignore_eos=True)
    snapkv = get_method("snapkv", budget=40, window=8)
    model = qwen_pair.target.model
    positions_seen = []

    def answer(replace: bool) -> list[int]:
        prepared = prepare(qwen_pair, [request], [snapkv])[0]
        step = None
        if replace:
            eager = EagerStep(model, prepared.cache, prepared.attention_mask, 10)

            class Step:
                def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
                    positions_seen.append(int(positions[0, 0]))
                    return eager(tokens, positions)

                def select(self, rows: list[int], taken: int) -> Step:
                    raise AssertionError("one row never shrinks")

            step = Step()

        with torch.inference_mode():
            return decode(model, prepared.cache, prepared.first_logits, torch.tensor(prepared.batch.next_positions),
                          prepared.attention_mask,
                          DecodeSpec([10], [request.sampling], [set()], step=step)).rows[0].token_ids

    plain = answer(replace=False)
    assert answer(replace=True) == plain and len(plain) == 10
    n = prepare(qwen_pair, [request], ["dense"])[0].batch.lengths[0]
    assert positions_seen == list(range(n, n + 9))  # explicit logical positions, one call per token after the first


def test_a_cpu_decode_reads_each_kv_head_once_for_its_grouped_query_heads(qwen_pair, monkeypatch):
    """Every decode step on a CPU runs `stacked_sdpa` (SDPA's own grouped path for one query is many times
    slower there), and the tokens are those of transformers' own attention."""
    from contextlib import nullcontext

    import draftkv
    from draftkv.engine import attention, decoding

    calls = []
    real = attention.stacked_sdpa
    monkeypatch.setattr(attention, "stacked_sdpa", lambda *a, **k: calls.append(a[1].shape[2]) or real(*a, **k))
    stacked = draftkv.generate(qwen_pair, long_context(200, seed=4), "what is the magic number?", method="snapkv", budget=64,
                               max_new_tokens=6)
    layers = qwen_pair.target.model.config.num_hidden_layers
    assert calls.count(1) == layers * (len(stacked.token_ids) - 1)  # every step, every layer, one query
    assert qwen_pair.target.model.config._attn_implementation == "sdpa"  # as it was
    monkeypatch.setattr(decoding, "few_queries", lambda model: nullcontext())
    plain = draftkv.generate(qwen_pair, long_context(200, seed=4), "what is the magic number?", method="snapkv", budget=64,
                             max_new_tokens=6)
    assert plain.token_ids == stacked.token_ids
