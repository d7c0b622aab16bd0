"""The server's own OpenAPI schema drives a property-based fuzzer (Schemathesis) against a tiny-model
server: valid and invalid bodies for every route, a bounded number of cases. No case may get a 5xx,
every error must come in OpenAI's shape, and afterwards the server answers a normal request as a fresh
one does."""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from conftest import tiny_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live import MESSAGES, MODEL, post, serve
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

import draftkv

# Small limits keep each generated request cheap: a case that asks for more is a 400, which is checked too.
LIMITS = {"max_tokens_limit": 8, "max_guess_tokens": 16, "max_body_bytes": 2**16, "timeout": 60.0}


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2", max_positions=512)


@pytest.fixture(scope="module")
def live(pair):
    server = serve(pair, max_tokens=4, **LIMITS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(live):
    return schemathesis.openapi.from_url(f"{live.root}/openapi.json")


def openai_error_shape(_context, response, _case) -> None:
    """Every error is {"error": {"message", "type", "param", "code"}} with a message that says something."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body


MODES = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]


@pytest.mark.parametrize("mode", MODES, ids=[mode.value for mode in MODES])
def test_no_request_the_schema_allows_or_breaks_gets_a_5xx_or_another_error_shape(api, live, mode):
    """The schema's valid bodies (positive) and bodies that break it (negative), for every route."""
    statuses: list[int] = []
    for result in api.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and operation.method.upper() != "POST":
            continue  # a route that takes nothing has nothing to break

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case) -> None:
            response = case.call(base_url=live.root, timeout=60)
            statuses.append(response.status_code)
            case.validate_response(response, checks=[not_a_server_error], additional_checks=[openai_error_shape])

        fuzz()
        assert httpx.get(f"{live.root}/health").status_code == 200
    assert len(statuses) > 60 and max(statuses) < 500
    if mode is GenerationMode.POSITIVE:
        assert 200 in statuses  # some generated requests were answered, not only refused
    else:
        assert 400 in statuses


def test_after_fuzzing_the_server_answers_as_a_fresh_one(live, pair):
    reply = post(live, "/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 6})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == draftkv.generate(pair, messages=MESSAGES,
                                                                                max_new_tokens=6).text
    assert live.app.state.server.scheduler.restarts == 0


CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "text/plain", "application/xml", "",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "APPLICATION/JSON"]
NUMBERS = st.one_of(st.integers(1, 6000).map(lambda digits: "9" * digits), st.integers(-2**80, 2**80).map(str),
                    st.sampled_from(["1e999", "-1e999", "1e-400", "1e-300", "5e-324", "NaN", "Infinity",
                                     "-Infinity", "-0", "0.5"]))
FIELDS = ["seed", "max_tokens", "temperature", "top_p", "top_k", "budget", "logprobs", "n", "speculate", "window"]


def test_other_content_types_and_huge_numbers_get_a_4xx_in_openai_shape(live):
    """What the schema cannot say: bodies sent as other media types, and numbers no field takes (thousands of
    digits, overflowing or underflowing exponents, NaN): each a 4xx in OpenAI's shape, never a 5xx."""
    statuses: list[int] = []

    @given(content_type=st.sampled_from(CONTENT_TYPES), field=st.sampled_from(FIELDS), number=NUMBERS,
           route=st.sampled_from(["/chat/completions", "/completions"]))
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def fuzz(content_type: str, field: str, number: str, route: str) -> None:
        prompt = '"messages": [{"role": "user", "content": "hi"}]' if route == "/chat/completions" else '"prompt": "hi"'
        body = f'{{"model": "{MODEL}", {prompt}, "max_tokens": 2, "{field}": {number}}}'.encode()
        if field == "max_tokens":
            body = body.replace(b'"max_tokens": 2, ', b"")
        headers = {"content-type": content_type} if content_type else {}
        response = httpx.post(live.url + route, content=body, headers=headers, timeout=60)
        statuses.append(response.status_code)
        assert response.status_code < 500, (content_type, field, number[:40], response.text[:300])
        if content_type.split(";")[0].strip().lower() != "application/json":
            assert response.status_code == 415
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"]

    fuzz()
    assert 415 in statuses and 400 in statuses
    assert httpx.get(f"{live.root}/health").status_code == 200
