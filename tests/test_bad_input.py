"""Bad input to the Python API gives a draftkv error that names the argument, what was given and what is
allowed, before any model work (issue 21's API cases)."""

from __future__ import annotations

import pytest

import draftkv
from draftkv.errors import ConfigError, PromptError

CASES = [  # (keyword arguments of generate beside the pair, error, words the message must hold)
    ({"context": 123, "question": "q"}, ConfigError, "context must be a string, got int"),
    ({"context": None, "question": "q"}, ConfigError, "context must be a string, got NoneType"),
    ({"context": "x", "question": 5}, ConfigError, "question must be a string"),
    ({"context": "x", "question": "q", "max_new_tokens": "4"}, ConfigError, "max_new_tokens must be an int >= 1, got '4'"),
    ({"context": "x", "question": "q", "max_new_tokens": 0}, ConfigError, "max_new_tokens must be an int >= 1, got 0"),
    ({"context": "x", "question": "q", "max_new_tokens": True}, ConfigError, "max_new_tokens must be an int"),
    ({"context": "x", "question": "q", "temperature": "0.5"}, ConfigError, "temperature must be a number >= 0"),
    ({"context": "x", "question": "q", "temperature": -1}, ConfigError, "temperature must be a number >= 0"),
    ({"context": "x", "question": "q", "top_p": 2}, ConfigError, "top_p must be a number in (0, 1]"),
    ({"context": "x", "question": "q", "top_k": 1.5}, ConfigError, "top_k must be an int >= 0"),
    ({"context": "x", "question": "q", "seed": "7"}, ConfigError, "seed must be an int or None"),
    ({"context": "x", "question": "q", "seed": 2**70}, ConfigError, "seed must be an int or None, from -2**63"),
    ({"context": "x", "question": "q", "seed": -(2**63) - 1}, ConfigError, "seed must be an int or None, from -2**63"),
    ({"context": "x", "question": "q", "stop": [1]}, ConfigError, "stop must be a string or a list of strings"),
    ({"context": "alpha \ud800 bravo", "question": "q"}, ConfigError, "context holds '\\ud800' at character 6, a lone"),
    ({"messages": [{"role": "user", "content": "hi \udfff"}]}, ConfigError, "messages[0]['content'] holds '\\udfff'"),
    ({"context": "alpha bravo " * 20, "question": "q", "method": "laq", "budget": 40, "pseudo_tokens": 5000},
     PromptError, "5000 more are asked for, past the target's context limit of 4096"),
    ({"messages": "Hi"}, ConfigError, "messages must be a non-empty list"),
    ({"messages": []}, ConfigError, "messages must be a non-empty list"),
    ({"messages": [{"role": "wizard", "content": "Hi"}]}, ConfigError, "role 'wizard'; allowed: system, user, assistant, tool"),
    ({"messages": [{"role": "user", "text": "Hi"}]}, ConfigError, "messages[0] must be a dict with 'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, ConfigError, "messages[0]['content'] must be a string"),
    ({"context": "", "question": ""}, PromptError, "the prompt is empty"),
    ({"context": "x", "question": "q", "method": "nope"}, ConfigError, "unknown method 'nope'"),
    ({"context": "x", "question": "q", "method": "snapkv", "compression_ratio": 1}, ConfigError,
     "compression_ratio must be a number in [0, 1)"),
    ({"context": "x", "question": "q", "method": "snapkv", "compression_ratio": 0.5, "budget": 8}, ConfigError,
     "not both"),
    ({"context": "x", "question": "q", "method": "dense", "compression_ratio": 0.5}, ConfigError,
     "compresses nothing"),
]


@pytest.mark.parametrize(("kwargs", "error", "words"), CASES, ids=[c[2][:40] for c in CASES])
def test_bad_arguments_to_generate_are_named(qwen_pair, kwargs, error, words):
    calls = []
    hook = qwen_pair.target.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        with pytest.raises(error) as raised:
            draftkv.generate(qwen_pair, **kwargs)
    finally:
        hook.remove()
    assert words in str(raised.value)
    assert calls == []  # no model work before the error


@pytest.mark.parametrize("call", [
    lambda: draftkv.generate("notapair", context="x", question="q"),
    lambda: draftkv.generate_batch(None, [draftkv.Request(context="x", question="q")]),
    lambda: draftkv.compress_prompt({"target": 1}, context="x", question="q"),
    lambda: draftkv.compress_context(42, "some context"),
])
def test_something_else_than_a_pair_is_named(call):
    with pytest.raises(ConfigError, match="pair must be a draftkv.ModelPair"):
        call()


def test_a_batch_must_be_a_list_of_requests(qwen_pair):
    with pytest.raises(ConfigError, match="requests must be a list of draftkv.Request"):
        draftkv.generate_batch(qwen_pair, ["what?"])


def test_query_agnostic_arguments_are_checked(qwen_pair):
    with pytest.raises(ConfigError, match="context must be a string, got NoneType"):
        draftkv.compress_context(qwen_pair, None)
    compressed = draftkv.compress_context(qwen_pair, "alpha bravo charlie " * 40, budget=48, window=8)
    with pytest.raises(ConfigError, match="question must be a string, got int"):
        compressed.ask(3)


def test_known_roles_are_answered(qwen_pair):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "alpha bravo?"},
                {"role": "assistant", "content": "charlie."}, {"role": "user", "content": "and delta?"}]
    assert draftkv.generate(qwen_pair, messages=messages, max_new_tokens=2).stats.new_tokens >= 1
