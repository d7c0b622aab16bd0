"""The static decode step (fixed shapes, a CUDA graph on CUDA): on a CPU it runs uncaptured and must
give the eager step's tokens for every method, and fall back to the eager step where it cannot run."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_pair
from tiny import long_context

import draftkv
from draftkv.engine import decoding, static
from draftkv.errors import ConfigError
from draftkv.flow import prepare, run
from draftkv.methods import budget_kinds, budget_params, get_method
from draftkv.types import Request, Sampling

REQUESTS = [Request(context=long_context(260, seed=41), question="what is the magic number?", max_new_tokens=9,
                    ignore_eos=True),
            Request(context=long_context(140, seed=42), question="when is the launch?", max_new_tokens=5,
                    ignore_eos=True, stop=("e",), sampling=Sampling(temperature=0.7, seed=3))]


def method(name: str):
    takes_kv, takes_prompt = budget_kinds(name)
    return get_method(name, **budget_params(name, 48 if takes_kv else None, 120 if takes_prompt else None))


class StepSpy:
    """Counts the steps each backend builds."""

    def __init__(self, monkeypatch) -> None:
        self.built = {"static": 0, "eager": 0}
        real_static, real_eager = decoding.StaticStep, decoding.EagerStep

        def static_step(*args, **kwargs):
            self.built["static"] += 1
            return real_static(*args, **kwargs)

        def eager_step(*args, **kwargs):
            self.built["eager"] += 1
            return real_eager(*args, **kwargs)

        monkeypatch.setattr(decoding, "StaticStep", static_step)
        monkeypatch.setattr(decoding, "EagerStep", eager_step)


@pytest.mark.parametrize("name", list(draftkv.METHODS))
def test_the_static_step_gives_the_eager_steps_tokens_for_every_method(pair, name, monkeypatch):
    eager = run(dataclasses.replace(pair, decode="eager"), REQUESTS, [method(name)])[0]
    spy = StepSpy(monkeypatch)
    fixed = run(dataclasses.replace(pair, decode="static"), REQUESTS, [method(name)])[0]
    assert spy.built["static"] >= 1  # the target's decode at least
    for a, b in zip(eager, fixed, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text and a.finish_reason == b.finish_reason, name


def test_settings_decoded_together_take_the_static_step_too(qwen_pair, monkeypatch):
    methods = [method(name) for name in draftkv.METHODS]
    eager = run(qwen_pair, REQUESTS[:1], methods, decode_together=True)
    spy = StepSpy(monkeypatch)
    fixed = run(dataclasses.replace(qwen_pair, decode="static"), REQUESTS[:1], methods, decode_together=True)
    assert spy.built["static"] >= 1
    assert [r[0].token_ids for r in fixed] == [r[0].token_ids for r in eager]


def test_the_static_step_writes_in_place_and_leaves_the_request_cache_as_it_was(qwen_pair):
    from draftkv.flow import prepare

    prepared = prepare(qwen_pair, REQUESTS[:1], [method("pyramidkv")])[0]  # a ragged cache
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prepared.cache.layers]
    step = static.StaticStep(qwen_pair.target.model, prepared.cache, prepared.attention_mask, steps=4)
    layer = step.cache.layers[0]
    addresses = (layer.keys.data_ptr(), layer.valid.data_ptr())
    assert layer.capacity == prepared.cache.layers[0].keys.shape[2] + 4
    position = torch.tensor([[prepared.batch.next_positions[0]]])
    real = int(layer.valid.sum())
    for offset in range(3):
        step(torch.tensor([[5]]), position + offset)
    assert (layer.keys.data_ptr(), layer.valid.data_ptr()) == addresses  # same tensors, written in place
    assert int(layer.valid.sum()) == real + 3 * layer.valid.shape[1]  # one new slot per step and KV head
    for (keys, values), after in zip(before, prepared.cache.layers, strict=True):
        assert torch.equal(keys, after.keys) and torch.equal(values, after.values)


def test_a_sliding_window_model_or_decode_time_eviction_takes_the_eager_step(monkeypatch):
    from test_families import tiny_pair as family_pair

    pair = dataclasses.replace(family_pair("gemma3_text"), decode="static")
    spy = StepSpy(monkeypatch)
    fixed = run(pair, REQUESTS[:1], [method("snapkv")])[0][0]
    assert spy.built == {"static": 0, "eager": 1}
    assert fixed.token_ids == run(dataclasses.replace(pair, decode="eager"), REQUESTS[:1], [method("snapkv")])[0][0].token_ids
    qwen = dataclasses.replace(tiny_pair("qwen2"), decode="static")
    spy = StepSpy(monkeypatch)
    run(qwen, REQUESTS[:1], [get_method("snapkv", budget=48, evict_every=2)])
    assert spy.built == {"static": 0, "eager": 1}
    assert static.supports_static(pair.target.model, decoding.DynamicCache(config=pair.target.model.config)) is not None


def test_an_unknown_decode_backend_is_refused():
    with pytest.raises(ConfigError, match="eager, static"):
        decoding.check_backend("graph")


def test_the_draft_beside_the_target_gives_the_same_results(pair, monkeypatch):
    """On CUDA the draft's pass runs in a thread on its own stream while the target prefills; forced on
    a CPU (a thread, no streams) it must change nothing: the probe waits for the lookahead."""
    import threading

    from draftkv.flow import execute, finish, prepare_each

    methods = [method("speckv"), method("ada-speckv"), method("snapkv"), method("dense")]
    alone = [r for _, r in sorted(run_each_sequential(pair, methods))]
    threads, real = [], execute.draft_pass
    monkeypatch.setattr(execute, "draft_pass", lambda *a: threads.append(threading.current_thread().name) or real(*a))
    beside = [finish(pair, prepared) for _, prepared in sorted(prepare_each(pair, REQUESTS, methods, beside=True),
                                                                key=lambda item: item[0])]
    assert len(threads) == 1 and threads[0].startswith("draftkv-draft")
    prepare(pair, REQUESTS, [method("specpc")], beside=True)  # station 1 needs the draft: no thread
    assert len(threads) == 2 and threads[1] == threading.current_thread().name
    for a, b in zip(alone, beside, strict=True):
        for x, y in zip(a, b, strict=True):
            assert x.token_ids == y.token_ids and x.stats.lookahead_tokens == y.stats.lookahead_tokens
            assert x.kept_positions is None or all(torch.equal(p, q) for p, q in zip(x.kept_positions, y.kept_positions,
                                                                                      strict=True))


def run_each_sequential(pair, methods):
    from draftkv.flow import finish, prepare_each

    return [(index, finish(pair, prepared)) for index, prepared in prepare_each(pair, REQUESTS, methods, beside=False)]
