"""The OpenAI-compatible server and the compressing proxy, on loopback, with tiny models and the
official `openai` client."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import tiny_pair
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from live import MESSAGES, MODEL, Live, metric, post, serve
from tiny import long_context
from typer.testing import CliRunner

import draftkv
from draftkv.api import generate_batch
from draftkv.cli import app, parse_bytes
from draftkv.compress import compress_prompts
from draftkv.errors import ConfigError
from draftkv.methods import get_method
from draftkv.models import ModelPair
from draftkv.prompt import encode_prompt
from draftkv.serving.engine import entry_bytes, estimate_bytes
from draftkv.types import Request


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2", max_positions=2048)


@pytest.fixture(scope="module")
def live(pair):
    server = serve(pair)
    yield server
    server.stop()


def test_a_request_can_ask_for_speculative_decoding(live, pair):
    plain = live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    sped = live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                 extra_body={"speculate": 3, "method": "speckv", "budget": 40})
    expected = draftkv.generate(pair, messages=MESSAGES, max_new_tokens=12, method="speckv", budget=40)
    assert sped.choices[0].message.content == expected.text
    stats = sped.model_extra["draftkv"]
    assert stats["proposed_tokens"] > 0 and 0 <= stats["accepted_proposals"] <= stats["proposed_tokens"]
    assert plain.model_extra["draftkv"]["proposed_tokens"] == 0
    for bad in (65, "often"):
        with pytest.raises(openai.BadRequestError, match="speculate"):
            live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4,
                                                  extra_body={"speculate": bad})
    auto = live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12,
                                                 extra_body={"speculate": "auto", "method": "speckv", "budget": 40})
    assert auto.choices[0].message.content == expected.text  # sped up or not, auto decodes the same tokens


def test_a_request_can_ask_what_was_kept_of_each_prompt_token(live, pair, tmp_path):
    messages = [{"role": "user", "content": long_context(200, seed=3) + " what is the magic number?"}]
    for method, body in (("snapkv", {"budget": 40, "window": 8}), ("specpc", {"budget": 60, "window": 8})):
        reply = live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                                      extra_body={"method": method, **body, "inspect": True})
        block = reply.model_extra["draftkv"]
        expected = draftkv.generate(pair, messages=messages, max_new_tokens=6, method=method, **body)
        inspection = draftkv.Inspection.from_dict(block["inspect"])
        (view,) = inspection.views
        assert len(inspection.tokens) == len(view.kept_share) == block["prompt_tokens"]
        assert view.answer == expected.text == reply.choices[0].message.content
        if method == "snapkv":  # each token: the share of layers and heads that kept it
            assert sum(view.kept_share) == pytest.approx(expected.stats.kv_entries, abs=0.01)
        else:
            assert [i for i, s in enumerate(view.kept_share) if s] == expected.kept_tokens.tolist()
        assert "what is the magic number?" in "".join(inspection.tokens)
        assert view.label.startswith(method) and view.label in inspection.to_html()
    plain = live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert "inspect" not in plain.model_extra["draftkv"]
    with pytest.raises(openai.BadRequestError, match="inspect"):
        live.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=2,
                                              extra_body={"inspect": "yes"})


def test_chat_answer_equals_the_library_and_reports_usage(live, pair):
    expected = draftkv.generate(pair, messages=MESSAGES, max_new_tokens=12)
    reply = live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    assert reply.usage.completion_tokens == expected.stats.new_tokens
    assert reply.usage.model_extra["kept_prompt_tokens"] == expected.stats.prompt_tokens  # dense keeps all
    assert reply.model_extra["draftkv"]["method"] == "dense"
    assert reply.usage.model_extra["dtype"] == reply.model_extra["draftkv"]["dtype"] == "float32"  # the pair's


def test_chat_stream_is_the_same_text_with_usage_at_the_end(live):
    client = live.client()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_stream_and_not(live, pair):
    prompt = "the launch is on monday at noon. the launch is on"
    expected = generate_batch(pair, [Request(context=prompt, chat_template=False, max_new_tokens=10)])[0]
    client = live.client()
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10)
    assert reply.choices[0].text == expected.text
    assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=MODEL, prompt=prompt,
                                                                            max_tokens=10, stream=True))
    assert streamed == expected.text


def test_per_request_methods_and_budgets(live, pair):
    context = long_context(400)
    messages = [{"role": "user", "content": context + " what is the magic number?"}]
    client = live.client()
    for method, body, check in [
        ("speckv", {"budget": 48}, lambda stats: stats["kv_entries"] == 48),
        ("snapkv", {"budget": 24, "window": 8}, lambda stats: stats["kv_entries"] == 24),
        ("snapkv", {"compression_ratio": 0.75, "window": 8},  # kvpress's name: a quarter kept
         lambda stats: stats["kv_entries"] == -(-stats["prompt_tokens"] // 4)),
        ("specpc", {"prompt_budget": 96, "window": 16, "start_layer": 0}, lambda stats: stats["kept_prompt_tokens"] == 96),
        ("speckv-pc", {"budget": 48, "prompt_budget": 128, "start_layer": 0}, lambda stats: stats["kv_entries"] == 48
         and stats["kept_prompt_tokens"] == 128),
        ("kvzip", {"budget": 40, "chunk": 128}, lambda stats: stats["kv_entries"] == 40
         and stats["timings"]["reconstruction"] > 0),
        ("keydiff", {"compression_ratio": 0.75}, lambda stats: stats["kv_entries"] == -(-stats["prompt_tokens"] // 4)),
    ]:
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8,
                                               extra_body={"method": method, **body})
        stats = reply.model_extra["draftkv"]
        assert stats["method"] == method and check(stats), (method, stats)
        params = {("budget" if method == "specpc" and key == "prompt_budget" else key): value
                  for key, value in body.items()}
        expected = draftkv.generate(pair, messages=messages, max_new_tokens=8, method=method, **params)
        assert reply.choices[0].message.content == expected.text, method


def test_completion_logprobs_and_echo_are_the_dense_prompts_and_the_compressed_answers(live, pair):
    """echo + logprobs: the prompt's tokens scored by the dense model, the new tokens' from the compressed
    cache; a prompt of token ids is read as it is."""
    from draftkv.likelihood import score_continuations

    prompt = long_context(300, seed=5) + " The magic number is"
    ids = pair.tokenizer(prompt)["input_ids"]
    for body_prompt in (prompt, [ids]):
        reply = live.client().completions.create(model=MODEL, prompt=body_prompt, max_tokens=4, logprobs=2, echo=True,
                                                 temperature=0, extra_body={"method": "snapkv", "budget": 32,
                                                                            "window": 8})
        choice = reply.choices[0]
        assert choice.text.startswith(prompt)
        logprobs = choice.logprobs
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        dense = score_continuations(pair, ids[:1], [ids[1:]], "dense")[0][0]
        assert logprobs.token_logprobs[1:len(ids)] == pytest.approx(dense.logprobs, abs=1e-4)
        expected = generate_batch(pair, [Request(prompt_ids=ids, max_new_tokens=4, logprobs=2)], "snapkv", budget=32,
                                  window=8)[0]
        generated = logprobs.token_logprobs[len(ids):]
        assert generated == pytest.approx([t.logprob for t in expected.logprobs][:len(generated)], abs=1e-5)
        assert all(max(top.values()) >= value for top, value in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:],
                                                                     strict=True))
        assert logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_completion_logprobs_keep_byte_tokens_apart_and_offsets_point_at_each_token(live, pair):
    """A token that is part of a character is written "bytes:\\xNN" (its own bytes, so distinct tokens stay
    distinct keys), and every text_offset points at its token's text (or the character it starts in)."""
    prompt = "ab 東京 ✓ x"
    reply = live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=24, logprobs=5, echo=True)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    ids = pair.tokenizer(prompt)["input_ids"]
    assert choice.text.startswith(prompt)
    assert logprobs.tokens[:len(ids)] == ["a", "b", "bytes:\\x20\\xe6\\x9d", "bytes:\\xb1\\xe4", "bytes:\\xba\\xac",
                                          "bytes:\\x20\\xe2\\x9c", "bytes:\\x93", " ", "x"]
    assert logprobs.text_offset[:len(ids)] == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # 東 at 3, 京 at 4, ✓ at 6
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        if not token.startswith("bytes:"):
            assert choice.text[offset: offset + len(token)] == token, (token, offset)
    # The answer's alternatives: five distinct tokens are five keys, even where several are partial characters.
    expected = generate_batch(pair, [Request(prompt_ids=ids, max_new_tokens=24, logprobs=5)])[0]
    collisions = 0
    for top, scored in zip(logprobs.top_logprobs[len(ids):], expected.logprobs, strict=False):
        assert len(top) >= 5
        collisions += len({pair.tokenizer.decode([i]) for i, _ in scored.top}) < 5
    assert collisions > 0  # decoded one by one, some alternatives would have been one key


def test_chat_logprobs_in_openais_shape(live, pair):
    reply = live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True,
                                                  top_logprobs=3, extra_body={"method": "speckv", "budget": 24,
                                                                              "window": 8})
    content = reply.choices[0].logprobs.content
    expected = draftkv.generate(pair, messages=MESSAGES, max_new_tokens=5, method="speckv", budget=24, window=8)
    # Each token's own bytes, joined, are the answer; a token that is part of a character is "bytes:\\xNN".
    assert b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", "replace") == expected.text
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.logprob
        try:
            assert bytes(entry.bytes).decode("utf-8") == entry.token
        except UnicodeDecodeError:
            assert entry.token == "bytes:" + "".join(f"\\x{byte:02x}" for byte in entry.bytes)


def test_lm_evals_local_completions_scores_through_the_server(live, pair, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from pathlib import Path

    from lm_eval.tasks import TaskManager

    pair.tokenizer.save_pretrained(tmp_path / "tokenizer")
    monkeypatch.chdir(Path(__file__).parent.parent)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["draftkv_tiny_gen", "draftkv_tiny_mc"], limit=2,
        model_args={"base_url": live.url + "/completions", "model": MODEL, "tokenizer_backend": "huggingface",
                    "tokenizer": str(tmp_path / "tokenizer"), "num_concurrent": 1, "max_retries": 1},
        task_manager=TaskManager(include_path="tests/lm_eval_tasks"))
    assert 0 <= results["results"]["draftkv_tiny_mc"]["acc,none"] <= 1
    assert 0 <= results["results"]["draftkv_tiny_gen"]["exact_match,none"] <= 1


def test_server_wide_default_method_and_its_parameters(pair):
    server = serve(pair, method="snapkv", params={"budget": 20, "window": 8})
    try:
        messages = [{"role": "user", "content": long_context(300) + " what?"}]
        client = server.client()
        stats = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4).model_extra["draftkv"]
        assert (stats["method"], stats["kv_entries"]) == ("snapkv", 20)
        # The request's own budget replaces the server's; another method does not inherit them.
        stats = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                               extra_body={"budget": 40}).model_extra["draftkv"]
        assert (stats["kv_entries"], stats["params"]["window"]) == (40, 8)
        stats = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                               extra_body={"method": "streamingllm"}).model_extra["draftkv"]
        assert stats["params"]["budget"] == get_method("streamingllm").budget
    finally:
        server.stop()


def nested(depth: int) -> list:
    value: list | int = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("body, status, code, words", [
    (b"{not json", 400, "invalid_json", "not valid JSON"),
    (b"[1, 2]", 400, "invalid_json", "JSON object"),
    ({"model": MODEL}, 400, "missing_field", "messages"),
    ({"messages": MESSAGES}, 400, "missing_field", "model"),
    ({"model": MODEL, "messages": []}, 400, "invalid_value", "messages"),
    ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value", "role"),
    ({"model": "gpt-9", "messages": MESSAGES}, 404, "model_not_found", "gpt-9"),
    ({"model": MODEL, "messages": MESSAGES, "method": "magic"}, 400, "unknown_method", "available"),
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "colour": 3}, 400, "invalid_parameter", "colour"),
    ({"model": MODEL, "messages": MESSAGES, "method": "dense", "budget": 64}, 400, "invalid_parameter", "budget"),
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "budget": -5}, 400, "invalid_value", "budget"),
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "budget": 1.5}, 400, "invalid_parameter", "budget"),
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "prompt_budget": 64}, 400, "invalid_parameter",
     "prompt_budget"),
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "compression_ratio": 1.0}, 400, "invalid_value",
     "compression_ratio"),
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "compression_ratio": 0.5, "budget": 64}, 400,
     "invalid_parameter", "not both"),
    ({"model": MODEL, "messages": MESSAGES, "n": 2}, 400, "unsupported_parameter", "n must be 1"),
    ({"model": MODEL, "messages": MESSAGES, "logprobs": True, "stream": True}, 400, "unsupported_parameter",
     "whole responses only"),
    ({"model": MODEL, "messages": MESSAGES, "top_logprobs": 2}, 400, "invalid_value", "needs logprobs"),
    ({"model": MODEL, "messages": MESSAGES, "logprobs": True, "top_logprobs": 50}, 400, "invalid_value",
     "top_logprobs"),
    ({"model": MODEL, "messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "unsupported_parameter", "tools"),
    ({"model": MODEL, "messages": MESSAGES, "temperature": 5}, 400, "invalid_value", "temperature"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "  "}]}, 400, "invalid_prompt", "empty"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "unsupported_content", "text parts"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": 5000}, 400, "context_length_exceeded", "context"),
    # Strict types: no bool taken as a number, no string as a bool; the field named as written.
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "budget": True}, 400, "invalid_value", "budget:"),
    ({"model": MODEL, "messages": MESSAGES, "stream": "yes"}, 400, "invalid_value", "stream:"),
    ({"model": MODEL, "messages": MESSAGES, "max_tokens": "8"}, 400, "invalid_value", "max_tokens:"),
    ({"model": MODEL, "messages": MESSAGES, "temperature": True}, 400, "invalid_value", "temperature:"),
    ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value", "messages[0].content:"),
    # Hostile input (issue 33): none of these may reach the tokenizer, the generator or the recursion limit.
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi \ud800 there"}]}, 400, "invalid_value",
     "messages[0].content holds '\\ud800' at character 3, a lone surrogate"),
    ({"model": MODEL, "messages": MESSAGES, "stop": ["\udfff"]}, 400, "invalid_value", "stop[0] holds"),
    ({"model": MODEL, "messages": MESSAGES, "seed": 2**70}, 400, "invalid_value", "seed:"),
    ({"model": MODEL, "messages": MESSAGES, "seed": -(2**63) - 1}, 400, "invalid_value", "seed:"),
    (b"[" * 5000 + b"]" * 5000, 400, "invalid_json", "nested more than 32"),
    (b'{"model": "tiny", "seed": ' + b"7" * 5000 + b"}", 400, "invalid_value", "an integer of 5,000 digits"),
    (b'{"model": "tiny", "temperature": NaN}', 400, "invalid_json", "holds NaN, which is not JSON"),
    (b'{"model": "tiny", "top_p": -Infinity}', 400, "invalid_json", "holds -Infinity"),
    (b'{"model": "tiny", "\\ud800x": 1}', 400, "invalid_value", "\\ud800x holds '\\ud800' at character 0"),
    (b'{"model": "tiny", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, "invalid_json", "nested more than 32"),
    ({"model": MODEL, "messages": MESSAGES, "metadata": nested(40)},
     400, "invalid_json", "nested more than 32 levels deep (at metadata"),
    ({"model": MODEL, "messages": MESSAGES, "method": "laq", "budget": 64, "pseudo_tokens": 5000}, 400,
     "invalid_parameter", "guess of 5000 tokens"),
    ({"model": MODEL, "messages": MESSAGES, "method": "speckv", "budget": 64, "lookahead": 4000}, 400,
     "invalid_parameter", "more than this server's limit of 512"),
    ({"model": MODEL, "messages": MESSAGES, "method": "speckv", "budget": 64, "max_lookahead": 1500,
      "max_tokens": 1500}, 400, "invalid_parameter", "guess of 1500 tokens"),
])
def test_bad_input_gets_the_openai_error_shape_and_the_server_keeps_serving(live, body, status, code, words):
    response = post(live, "/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    assert set(error) == {"message", "type", "param", "code"}
    assert httpx.get(f"http://127.0.0.1:{live.port}/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, code, words", [
    ({"model": MODEL, "prompt": "alpha \ud800"}, "invalid_value", "prompt holds '\\ud800'"),
    ({"model": MODEL, "prompt": ["alpha \udfff"]}, "invalid_value", "prompt[0] holds '\\udfff'"),
    ({"model": MODEL, "prompt": [-1]}, "invalid_prompt", "token id -1; token ids of this model are 0 to 499"),
    ({"model": MODEL, "prompt": [[-5, 3]]}, "invalid_prompt", "token id -5"),
    ({"model": MODEL, "prompt": [3, 500]}, "invalid_prompt", "token id 500"),
    ({"model": MODEL, "prompt": "alpha", "seed": 2**70}, "invalid_value", "seed:"),
    ({"model": MODEL, "prompt": "alpha", "method": "laq", "budget": 64, "pseudo_tokens": 5000}, "invalid_parameter",
     "guess of 5000 tokens"),
])
def test_bad_completions_input_is_refused_and_the_next_request_is_answered(live, pair, body, code, words):
    response = post(live, "/completions", body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == code and words in error["message"], error
    prompt = "the launch is on monday at noon. the launch is on"
    expected = generate_batch(pair, [Request(context=prompt, chat_template=False, max_new_tokens=6)])[0]
    assert live.client().completions.create(model=MODEL, prompt=prompt, max_tokens=6).choices[0].text == expected.text


@pytest.mark.parametrize(("body", "param"), [
    ({"model": MODEL, "messages": MESSAGES, "method": "snapkv", "budget": True}, "budget"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"model": MODEL, "messages": MESSAGES, "stop": [1]}, "stop"),
])
def test_the_param_of_an_error_is_the_field_as_written(live, body, param):
    error = post(live, "/chat/completions", body).json()["error"]
    assert error["param"] == param, error


@pytest.mark.parametrize(("verb", "path", "status"), [("get", "/v1/nothing", 404), ("post", "/v2/chat", 404),
                                                      ("get", "/v1/chat/completions", 405)])
def test_unknown_routes_answer_in_the_openai_error_shape(live, verb, path, status):
    response = getattr(httpx, verb)(f"http://127.0.0.1:{live.port}{path}", timeout=30)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and path in error["message"], error


def test_openai_client_raises_the_matching_errors(live):
    client = live.client()
    with pytest.raises(openai.BadRequestError, match="unknown method"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"method": "nope"})
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="other", prompt="hello")
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices


def test_oversized_prompt_memory_and_timeout_limits(pair):
    long = [{"role": "user", "content": long_context(500)}]
    server = serve(pair, max_prompt_tokens=200)
    try:
        with pytest.raises(openai.BadRequestError, match="limit of 200"):
            server.client().chat.completions.create(model=MODEL, messages=long)
    finally:
        server.stop()
    needed = estimate_bytes(pair, get_method("dense"), 500, 16)
    server = serve(pair, memory_limit=needed // 2)
    try:
        response = post(server, "/chat/completions", {"model": MODEL, "messages": long, "max_tokens": 16})
        assert response.status_code == 503 and response.json()["error"]["code"] == "insufficient_memory"
        assert "MiB" in response.json()["error"]["message"]
        # A short request still fits.
        assert server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices
    finally:
        server.stop()
    server = serve(pair, timeout=1e-3)
    try:
        response = post(server, "/chat/completions", {"model": MODEL, "messages": MESSAGES})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    finally:
        server.stop()


def test_memory_estimate_grows_with_the_prompt_and_shrinks_with_prompt_methods(pair):
    dense = get_method("dense")
    assert estimate_bytes(pair, dense, 1000, 16) > estimate_bytes(pair, dense, 500, 16) > 0
    # SpecPC adds the draft's pass but prefills the target on 128 tokens instead of 1000.
    specpc = get_method("specpc", budget=128, window=16)
    target_only = ModelPair(pair.target)
    assert estimate_bytes(target_only, specpc, 1000, 16) < estimate_bytes(target_only, dense, 1000, 16)
    # Speculation adds the draft's cache: all of the prompt for dense, the budget where it is compressed.
    draft_entry = entry_bytes(pair.draft.model)
    plain, sped = estimate_bytes(pair, dense, 1000, 16), estimate_bytes(pair, dense, 1000, 16, speculate=4)
    assert sped - plain >= (1000 + 16 + 4) * draft_entry
    assert estimate_bytes(pair, dense, 1000, 16, speculate="auto") > sped  # auto at its most proposals
    speckv = get_method("speckv", budget=64)
    compressed = estimate_bytes(pair, speckv, 1000, 16, speculate=4)
    whole = estimate_bytes(dataclasses.replace(pair, draft_cache="whole"), speckv, 1000, 16, speculate=4)
    assert whole - compressed == (1000 - 64) * draft_entry
    assert estimate_bytes(target_only, dense, 1000, 16, speculate=4) == estimate_bytes(target_only, dense, 1000, 16)


def test_cancelled_rows_stop_decoding(pair):
    request = Request(messages=MESSAGES, max_new_tokens=30)
    free = generate_batch(pair, [request, request])
    assert len(free[0].token_ids) > 3, "pick a prompt whose answer is longer than the cut"
    produced = {0: 0}

    def on_text(row: int, _text: str) -> None:
        produced[row] = produced.get(row, 0) + 1

    cut = generate_batch(pair, [request, request], on_text=on_text, cancelled=lambda row: row == 0 and produced[0] >= 2)
    assert cut[0].finish_reason == "cancelled" and cut[0].token_ids == free[0].token_ids[:len(cut[0].token_ids)]
    assert len(cut[0].token_ids) < len(free[0].token_ids)
    assert cut[1].token_ids == free[1].token_ids  # the other row is untouched


def test_a_client_that_disconnects_cancels_its_request_and_the_log_counts_what_it_was_sent(pair, caplog):
    server = serve(pair)
    jobs = []
    scheduler = server.app.state.server.scheduler
    submit = scheduler.submit
    scheduler.submit = lambda job: (jobs.append(job), submit(job))[1]
    try:
        with caplog.at_level(logging.INFO, logger="draftkv.serve"):
            stream = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1500,
                                                             stream=True)
            received = ""
            for chunk in stream:  # read until some text has arrived, then leave
                received += chunk.choices[0].delta.content or ""
                if len(received) >= 8:
                    break
            stream.close()
            deadline = time.monotonic() + 10
            while not jobs[0].cancelled:
                assert time.monotonic() < deadline, "the disconnect did not cancel the job"
                time.sleep(0.05)
            while metric(server, "draftkv_requests_total", status="499") < 1:
                assert time.monotonic() < deadline, "the disconnect was not counted"
                time.sleep(0.05)
        logged = json.loads([r for r in caplog.records if r.getMessage().startswith('{"event"')][-1].getMessage())
        sent = jobs[0].sent  # all the text handed to the client before it left
        assert received and sent.startswith(received)
        # The count is the answer's tokens whose text the client was sent: the first k, and not k + 1.
        ids = draftkv.generate(pair, messages=MESSAGES, max_new_tokens=1500).token_ids
        count = logged["completion_tokens"]
        assert logged["status"] == 499 and 1 <= count < 1500

        def text(k: int) -> str:
            return pair.tokenizer.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)

        assert sent.startswith(text(count).rstrip("\ufffd")) and not sent.startswith(text(count + 1))
        assert metric(server, "draftkv_completion_tokens_total") == logged["completion_tokens"]
    finally:
        server.stop()


def test_health_models_and_metrics(live):
    client = live.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    before = metric(live, "draftkv_requests_total", endpoint="chat", method="dense", status="200")
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert metric(live, "draftkv_requests_total", endpoint="chat", method="dense", status="200") == before + 1
    assert metric(live, "draftkv_prompt_tokens_total") >= reply.usage.prompt_tokens
    assert metric(live, "draftkv_request_latency_seconds_count", endpoint="chat") >= 1
    assert metric(live, "draftkv_batch_size_count") >= 1
    health = httpx.get(f"http://127.0.0.1:{live.port}/health").json()
    assert health == {"status": "ok"}  # the model and the queue are told only to the key (test_serve_faults)


def test_load_sixteen_clients_times_eight_requests_all_complete_and_correct(pair):
    server = serve(pair, max_batch_size=8)
    prompts = [f"{long_context(20 + 3 * client, seed=client)} what is number {index}?"
               for client in range(16) for index in range(8)]
    expected = {p: draftkv.generate(pair, messages=[{"role": "user", "content": p}], max_new_tokens=12).text
                for p in prompts}
    try:
        def one_client(client: int) -> list[bool]:
            api = server.client(timeout=120)
            ok = []
            for index in range(8):
                prompt = prompts[client * 8 + index]
                messages = [{"role": "user", "content": prompt}]
                if index % 2:
                    chunks = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True)
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                else:
                    text = api.chat.completions.create(model=MODEL, messages=messages,
                                                       max_tokens=12).choices[0].message.content
                ok.append(text == expected[prompt])
            return ok

        with ThreadPoolExecutor(16) as pool:
            results = [ok for batch in pool.map(one_client, range(16)) for ok in batch]
        assert len(results) == 128 and all(results)
        assert metric(server, "draftkv_requests_total", endpoint="chat", method="dense", status="200") == 128
        # Requests that waited together ran together.
        batches = metric(server, "draftkv_batch_size_count")
        assert batches < 128
        assert httpx.get(f"http://127.0.0.1:{server.port}/health").json()["status"] == "ok"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def upstream(pair):
    server = serve(pair)  # a dense draftkv server stands in for vLLM
    yield server
    server.stop()


def draft_only(pair: ModelPair) -> ModelPair:
    return ModelPair(pair.draft, pair.draft)


def test_proxy_sends_the_compressed_prompt_upstream_and_streams_the_answer(pair, upstream):
    proxy = serve(draft_only(pair), upstream=upstream.url, upstream_model=MODEL, method="specpc",
                  params={"budget": 96, "window": 16, "start_layer": 0})
    try:
        context = long_context(500)
        messages = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": context + " what is the magic number?"}]
        full = draftkv.compress_prompt(draft_only(pair), messages=messages, method="keep-last", budget=10**6)
        compressed = draftkv.compress_prompt(draft_only(pair), messages=messages, method="specpc", budget=96,
                                             window=16, start_layer=0)
        before = metric(upstream, "draftkv_prompt_tokens_total")
        reply = proxy.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10)
        received = metric(upstream, "draftkv_prompt_tokens_total") - before
        # The upstream got the kept text in place of the last message, and nothing more.
        direct = [*messages[:-1], {"role": "user", "content": compressed.text}]
        assert received == len(encode_prompt(pair.tokenizer, Request(messages=direct)).ids)
        assert received < full.prompt_tokens / 2
        assert reply.usage.prompt_tokens == full.prompt_tokens and reply.usage.model_extra["kept_prompt_tokens"] == received
        assert reply.choices[0].message.content == upstream.client().chat.completions.create(
            model=MODEL, messages=direct, max_tokens=10).choices[0].message.content
        chunks = list(proxy.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                             stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
        assert chunks[-1].usage.model_extra["kept_prompt_tokens"] == received
        # Completions are compressed too; dense passes the prompt through.
        prompt = context + " the magic number is"
        short = proxy.client().completions.create(model=MODEL, prompt=prompt, max_tokens=4)
        assert short.usage.model_extra["kept_prompt_tokens"] < short.usage.prompt_tokens
        whole = proxy.client().completions.create(model=MODEL, prompt=prompt, max_tokens=4,
                                                  extra_body={"method": "dense"})
        assert whole.usage.model_extra["kept_prompt_tokens"] == whole.usage.prompt_tokens > short.usage.prompt_tokens - 5
        # KV methods need the target, which runs upstream.
        with pytest.raises(openai.BadRequestError, match="prompt method"):
            proxy.client().chat.completions.create(model=MODEL, messages=messages, extra_body={"method": "snapkv"})
        with pytest.raises(openai.BadRequestError, match="inspect"):  # what was kept is the upstream's to say
            proxy.client().chat.completions.create(model=MODEL, messages=messages, extra_body={"inspect": True})
    finally:
        proxy.stop()


def test_proxy_reports_an_unreachable_or_failing_upstream(pair):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    proxy = serve(draft_only(pair), upstream=f"http://127.0.0.1:{closed_port}/v1", method="keep-last",
                  params={"budget": 64})
    broken = FastAPI()

    @broken.post("/v1/chat/completions")
    async def fail() -> JSONResponse:
        return JSONResponse({"error": {"message": "engine crashed", "type": "server_error"}}, status_code=500)

    failing = Live(broken)
    failing_proxy = serve(draft_only(pair), upstream=failing.url, method="keep-last", params={"budget": 64})
    try:
        for server, words in ((proxy, "unreachable"), (failing_proxy, "engine crashed")):
            for stream in (False, True):
                response = post(server, "/chat/completions", {"model": "any", "messages": MESSAGES, "stream": stream})
                assert response.status_code == 502 and words in response.json()["error"]["message"]
            assert httpx.get(f"http://127.0.0.1:{server.port}/health").json() == {"status": "ok"}
    finally:
        for server in (proxy, failing_proxy, failing):
            server.stop()


UPSTREAM_REPLIES = {  # what a broken upstream sends, by the model the request names
    "not-json": (200, b"hello there", "not JSON (it began 'hello there')"),
    "empty": (200, b"", "it was empty"),
    "list": (200, b"[1, 2]", "a JSON list, not an object"),
    "usage": (200, b'{"choices": [], "usage": "lots"}', "its usage is not an object of token counts"),
    "choices": (200, b'{"choices": "many"}', "its choices are not a list of objects"),
    "redirect": (302, b"", "answered 302, a redirect to 'http://elsewhere/v1/chat/completions', which is not followed"),
    "nan": (200, b'{"choices": [], "usage": {"prompt_tokens": NaN}}', "it holds NaN, which is not JSON"),
    "surrogate": (200, b'{"choices": [{"index": 0, "message": {"content": "\\ud800"}}]}',
                  "it holds text that is not valid Unicode"),
}
STREAM_REPLIES = {
    "bad-chunk": (b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\ndata: [1, 2]\n\n',
                  "stream chunk that is not an OpenAI completion: a JSON list"),
    "text-chunk": (b"data: oops\n\n", "stream chunk that is not an OpenAI completion: not JSON"),
}


@pytest.fixture(scope="module")
def broken_upstream():
    broken = FastAPI()

    @broken.post("/v1/chat/completions")
    async def reply(http: HttpRequest) -> Response:
        model = (await http.json())["model"]
        if model in STREAM_REPLIES:
            return StreamingResponse(iter([STREAM_REPLIES[model][0]]), media_type="text/event-stream")
        status, content, _ = UPSTREAM_REPLIES[model]
        headers = {"location": "http://elsewhere/v1/chat/completions"} if status == 302 else {}
        return Response(content, status_code=status, headers=headers, media_type="application/json")

    server = Live(broken)
    yield server
    server.stop()


@pytest.mark.parametrize("model", list(UPSTREAM_REPLIES))
def test_the_proxy_answers_502_to_whatever_is_not_an_openai_response(pair, broken_upstream, model, caplog):
    proxy = serve(draft_only(pair), upstream=broken_upstream.url, method="keep-last", params={"budget": 64})
    try:
        with caplog.at_level(logging.INFO, logger="draftkv.serve"):
            response = post(proxy, "/chat/completions", {"model": model, "messages": MESSAGES})
            deadline = time.monotonic() + 5
            while not [r for r in caplog.records if r.getMessage().startswith('{"event"')]:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert response.status_code == 502, response.text
        error = response.json()["error"]
        assert error["code"] == "upstream_error" and UPSTREAM_REPLIES[model][2] in error["message"], error
        logged = json.loads([r for r in caplog.records if r.getMessage().startswith('{"event"')][-1].getMessage())
        assert logged["status"] == 502  # logged as what the client got
        assert post(proxy, "/chat/completions", {"model": "not-json", "messages": MESSAGES}).status_code == 502
    finally:
        proxy.stop()


@pytest.mark.parametrize("model", list(STREAM_REPLIES))
def test_a_proxied_stream_ends_with_an_error_event_when_the_upstream_sends_nonsense(pair, broken_upstream, model):
    proxy = serve(draft_only(pair), upstream=broken_upstream.url, method="keep-last", params={"budget": 64})
    try:
        with httpx.stream("POST", proxy.url + "/chat/completions", timeout=30,
                          json={"model": model, "messages": MESSAGES, "stream": True}) as response:
            events = [line[5:].strip() for line in response.iter_lines() if line.startswith("data:")]
        last = json.loads(events[-1])
        assert last["error"]["code"] == "upstream_error" and STREAM_REPLIES[model][1] in last["error"]["message"]
    finally:
        proxy.stop()


def test_the_proxy_refuses_echo_when_it_compresses_and_forwards_token_ids_as_token_ids(pair, upstream):
    proxy = serve(draft_only(pair), upstream=upstream.url, upstream_model=MODEL, method="specpc",
                  params={"budget": 96, "window": 16, "start_layer": 0})
    try:
        prompt = long_context(400, seed=9) + " the magic number is"
        with pytest.raises(openai.BadRequestError, match="echo through the proxy would return the prompt"):
            proxy.client().completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, logprobs=1)
        dense = proxy.client().completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True,
                                                  extra_body={"method": "dense"})
        assert dense.choices[0].text.startswith(prompt)  # dense passes the client's prompt through
        ids = pair.tokenizer(prompt)["input_ids"]
        compressed = compress_prompts(draft_only(pair), [Request(prompt_ids=ids, max_new_tokens=3)],
                                              "specpc", budget=96, window=16, start_layer=0)[0]
        reply = proxy.client().completions.create(model=MODEL, prompt=ids, max_tokens=3)
        assert reply.usage.prompt_tokens == len(ids) and reply.usage.model_extra["kept_prompt_tokens"] == 96
        direct = upstream.client().completions.create(model=MODEL, prompt=compressed.token_ids, max_tokens=3)
        assert reply.choices[0].text == direct.choices[0].text
    finally:
        proxy.stop()


def test_parse_bytes():
    assert parse_bytes("8GiB", "--x") == 8 * 2**30 and parse_bytes("512MiB", "--x") == 512 * 2**20
    assert parse_bytes("2GB", "--x") == 2 * 10**9 and parse_bytes("1000", "--x") == 1000
    with pytest.raises(ConfigError, match="--memory-limit takes a memory size like 8GiB"):
        parse_bytes("lots", "--memory-limit")


def test_request_log_lines_are_json(live, caplog):
    with caplog.at_level(logging.INFO, logger="draftkv.serve"):
        live.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        deadline = time.monotonic() + 5
        while not [r for r in caplog.records if r.name == "draftkv.serve"] and time.monotonic() < deadline:
            time.sleep(0.02)
    line = json.loads([r for r in caplog.records if r.name == "draftkv.serve"][-1].getMessage())
    assert line["event"] == "request" and line["status"] == 200 and line["method"] == "dense"
    assert line["prompt_tokens"] > 0 and line["latency_s"] > 0


def test_the_serve_command_takes_its_configuration_from_the_environment(pair, tmp_path):
    for role, loaded in (("target", pair.target), ("draft", pair.draft)):
        loaded.model.save_pretrained(tmp_path / role)
        loaded.tokenizer.save_pretrained(tmp_path / role)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "DRAFTKV_PORT": str(port), "DRAFTKV_TARGET": str(tmp_path / "target"),
           "DRAFTKV_DRAFT": str(tmp_path / "draft"), "DRAFTKV_METHOD": "snapkv", "DRAFTKV_BUDGET": "24",
           "DRAFTKV_MODEL_NAME": "served", "DRAFTKV_DEVICE": "cpu", "DRAFTKV_LOG_LEVEL": "warning",
           "DRAFTKV_API_KEY": "k3y"}
    process = subprocess.Popen([sys.executable, "-m", "draftkv", "serve", "-p", "window=8"], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, "draftkv serve did not come up"
                time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0)
        messages = [{"role": "user", "content": long_context(200) + " what?"}]
        stats = client.chat.completions.create(model="served", messages=messages, max_tokens=3).model_extra["draftkv"]
        assert (stats["method"], stats["kv_entries"], stats["params"]["window"]) == ("snapkv", 24, 8)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_serve_command_refuses_a_bad_default_method(tmp_path):
    result = subprocess.run([sys.executable, "-m", "draftkv", "serve", "--method", "nope", "--target",
                             str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown method 'nope'" in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["--port", "99999"], "Invalid value for '--port' (env var: 'DRAFTKV_PORT'): Input should be less than or equal to 65535"),
    (["--port", "0"], "Invalid value for '--port' (env var: 'DRAFTKV_PORT'): Input should be greater than or equal to 1"),
    (["--timeout=-1"], "--timeout must be a number of seconds > 0, got -1.0"),
    (["--timeout", "nan"], "--timeout must be a number of seconds > 0"),
    (["--memory-limit=-1GiB"], "--memory-limit must be a whole number >= 1"),
    (["--memory-limit", "lots"], "--memory-limit takes a memory size like 8GiB"),
    (["--memory-limit", "infGiB"], "--memory-limit takes a memory size like 8GiB"),
    (["--max-body-bytes", "abc"], "--max-body-bytes takes a memory size like 8GiB"),
    (["--log-level", "loud"], "--log-level must be one of debug, info, warning, error, critical; got 'loud'"),
    (["--allow-origin", "https://app.example.com/page"], "--allow-origin 'https://app.example.com/page' is not an origin"),
    (["--allow-origin", "app.example.com"], "is not an origin; give one like https://app.example.com"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be a whole number >= 1"),
    (["--upstream", "not-a-url"], "--upstream 'not-a-url' is not an http(s) URL with a host"),
    (["--upstream-timeout", "0"], "--upstream-timeout must be a number of seconds > 0"),
    (["--max-tokens", "64", "--max-tokens-limit", "32"], "--max-tokens (64) is more than --max-tokens-limit (32)"),
    (["--max-logprobs", "21"], "Invalid value for '--max-logprobs' (env var: 'DRAFTKV_MAX_LOGPROBS'): Input should be less"),
    (["--api-key", ""], "--api-key is empty"),
    (["--upstream", "http://127.0.0.1:9/v1", "--method", "kvzip"], "'kvzip' compresses the target's KV cache"),
    (["--host", "no.such.host.invalid"], "cannot listen on no.such.host.invalid:"),
])
def test_every_serve_flag_is_checked_before_any_model_loads(tmp_path, args, words):
    result = CliRunner().invoke(app, ["serve", "--target", str(tmp_path / "missing"), "--draft", "none", *args])
    output = " ".join(re.sub("[│╭╮╰╯─]", " ", result.stdout + result.stderr).split())  # rich wraps and boxes lines
    assert result.exit_code == 2, output
    assert words in output and "Traceback" not in output
    assert "does not exist" not in output  # refused before the (missing) target was looked for


def test_the_serve_command_refuses_a_port_in_use(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(app, ["serve", "--target", str(tmp_path / "missing"), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in " ".join(result.stderr.split())


def test_a_temperature_too_small_to_divide_by_decodes_greedily(live):
    greedy = post(live, "/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 6})
    for temperature in (1e-300, 5e-324, 1e-45, 9e-6):
        sampled = post(live, "/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 6,
                                                   "temperature": temperature, "seed": 1})
        assert sampled.status_code == 200, sampled.text
        assert sampled.json()["choices"][0]["message"]["content"] == greedy.json()["choices"][0]["message"]["content"]
