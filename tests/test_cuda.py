"""CUDA and bfloat16: every method on a GPU agrees with the CPU run (float32) and stays sane in bfloat16.

These run only where CUDA is available (CI has no GPU); results/gpu-checks holds their output from a
lent GPU machine.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import assert_same_result
from tiny import long_context, make_model, make_tokenizer

import draftkv
from draftkv.methods import METHODS, budget_kinds
from draftkv.models import pair_from_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CONTEXT = long_context(500, seed=3)
LOOKAHEAD_METHODS = ("speckv", "ada-speckv", "laq", "speckv-pc")
QUESTION = "What is the special magic number?"


def pair_on(device: str, dtype: torch.dtype):
    tokenizer = make_tokenizer()
    target = make_model("qwen2", layers=3, seed=0)
    draft = make_model("qwen2", layers=2, hidden=32, seed=1)
    return pair_from_models(copy.deepcopy(target).to(device, dtype), tokenizer,
                            copy.deepcopy(draft).to(device, dtype), tokenizer)


@pytest.fixture(scope="module")
def pairs():
    return {
        "cpu": pair_on("cpu", torch.float32),
        "cuda": pair_on("cuda", torch.float32),
        "bf16": pair_on("cuda", torch.bfloat16),
    }


def budgets(method: str) -> dict:
    """Budgets of about a tenth (KV) and a third (prompt) of the ~700-token prompt; the tiny draft has
    2 layers, so SpecPC's attention counts from layer 0."""
    takes_kv, takes_prompt = budget_kinds(method)
    params = {"start_layer": 0} if method in ("specpc", "speckv-pc") else {}
    if method == "dense":
        return params
    if takes_kv and takes_prompt:
        return {**params, "budget": 64, "prompt_budget": 256}
    return {**params, "budget": 64 if takes_kv else 256}


def run(pair, method: str):
    return draftkv.generate(pair, context=CONTEXT, question=QUESTION, method=method, max_new_tokens=8,
                            **budgets(method))


def kept_sets(result) -> list[set[tuple[int, int]]]:
    return [{(head, p) for head, row in enumerate(layer.cpu().tolist()) for p in row} for layer in result.kept_positions]


@pytest.mark.parametrize("method", list(METHODS))
def test_cuda_float32_matches_cpu(pairs, method):
    on_cpu, on_cuda = run(pairs["cpu"], method), run(pairs["cuda"], method)
    assert on_cuda.stats.kv_entries == on_cpu.stats.kv_entries
    assert on_cuda.stats.kept_prompt_tokens == on_cpu.stats.kept_prompt_tokens
    assert on_cuda.stats.lookahead_tokens == on_cpu.stats.lookahead_tokens
    if on_cpu.kept_positions is not None:
        assert kept_sets(on_cuda) == kept_sets(on_cpu)
    assert on_cuda.token_ids == on_cpu.token_ids


@pytest.mark.parametrize("method", list(METHODS))
def test_bfloat16_keeps_the_same_budget_at_half_the_bytes(pairs, method):
    full, half = run(pairs["cuda"], method), run(pairs["bf16"], method)
    assert half.stats.kv_entries == full.stats.kv_entries
    assert half.stats.kept_prompt_tokens == full.stats.kept_prompt_tokens
    assert half.stats.kv_bytes * 2 == full.stats.kv_bytes
    assert all(0 <= t < len(make_tokenizer()) for t in half.token_ids)
    if full.kept_positions is not None and method not in LOOKAHEAD_METHODS:
        # bfloat16 rounds the scores, so near-ties may flip; most of the selection must not. (With a
        # lookahead, the generated text itself may change, and with it what is scored.)
        overlaps = [len(a & b) / len(a) for a, b in zip(kept_sets(half), kept_sets(full), strict=True)]
        assert sum(overlaps) / len(overlaps) >= 0.8, overlaps


def test_a_cuda_batch_equals_one_by_one(pairs):
    requests = [draftkv.Request(context=CONTEXT, question=QUESTION, max_new_tokens=8),
                draftkv.Request(context=long_context(300, seed=4), question=QUESTION, max_new_tokens=8)]
    for method in ("speckv", "specpc"):
        together = draftkv.generate_batch(pairs["cuda"], requests, method, **budgets(method))
        for request, batched in zip(requests, together, strict=True):
            alone = draftkv.generate_batch(pairs["cuda"], [request], method, **budgets(method))[0]
            assert_same_result(batched, alone)


def test_cuda_peak_memory_is_measured(pairs):
    result = run(pairs["bf16"], "speckv")
    assert result.stats.peak_memory_bytes is not None and result.stats.peak_memory_bytes > 0


def test_cuda_scoring_is_timed_by_events(pairs):
    # CUDA events time the scoring kernels without a synchronisation per layer. The prefill's own time
    # is the wall time less the scoring, so scoring timed too long would leave it at or below zero.
    for method in ("snapkv", "h2o"):
        timings = run(pairs["cuda"], method).stats.timings
        assert timings["scoring"] > 0 and timings["target_prefill"] > 0, timings


@pytest.mark.parametrize("method", list(METHODS))
def test_the_captured_static_step_gives_the_eager_steps_tokens(pairs, method):
    import dataclasses

    from draftkv.engine import decoding

    cuda = pairs["cuda"]
    params = budgets(method)
    eager = draftkv.generate(dataclasses.replace(cuda, decode="eager"), CONTEXT, QUESTION, method=method,
                             max_new_tokens=12, **params)
    steps = []
    real = decoding.StaticStep

    def spy(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    decoding.StaticStep = spy
    try:
        fixed = draftkv.generate(dataclasses.replace(cuda, decode="static"), CONTEXT, QUESTION, method=method,
                                 max_new_tokens=12, **params)
    finally:
        decoding.StaticStep = real
    assert fixed.token_ids == eager.token_ids, method
    assert steps and all(step.shapes[1].graph is not None for step in steps)  # captured and replayed


def test_the_draft_beside_the_target_on_its_own_stream(pairs):
    from draftkv.flow import finish, prepare

    cuda = pairs["cuda"]
    request = draftkv.Request(context=CONTEXT, question=QUESTION, max_new_tokens=12)
    methods = [draftkv.get_method(m, **budgets(m)) for m in ("speckv", "ada-speckv", "snapkv", "dense")]
    alone = [finish(cuda, p)[0] for p in prepare(cuda, [request], methods, beside=False)]
    beside = [finish(cuda, p)[0] for p in prepare(cuda, [request], methods, beside=True)]
    for a, b in zip(alone, beside, strict=True):
        assert_same_result(b, a)


@pytest.mark.parametrize("method", ["dense", "speckv"])
def test_speculation_on_the_captured_static_step_gives_the_eager_steps_tokens(pairs, method, monkeypatch):
    """The target's check of k + 1 tokens and the draft's steps are captured once per width and replayed."""
    from draftkv.engine import speculation

    cuda = pairs["cuda"]
    steps = []
    real = speculation.StaticStep

    def spy(*args, **kwargs):
        steps.append(real(*args, **kwargs))
        return steps[-1]

    eager = run(dataclasses.replace(cuda, decode="eager", speculate=3), method)
    monkeypatch.setattr(speculation, "StaticStep", spy)
    fixed = run(dataclasses.replace(cuda, decode="static", speculate=3), method)
    assert fixed.token_ids == eager.token_ids == run(cuda, method).token_ids
    assert fixed.stats.proposed_tokens > 0
    assert len(steps) == 2 and all(shape.graph is not None for step in steps for shape in step.shapes.values())
    assert 4 in steps[0].shapes  # the target's check of three proposals
