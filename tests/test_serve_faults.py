"""One bad request harms no other: a failure at any stage fails that request alone, the worker never
stops serving, and the server's answers afterwards equal a fresh server's."""

from __future__ import annotations

import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import tiny_pair
from live import MODEL, metric, post, serve
from tiny import long_context

from draftkv.engine import speculation
from draftkv.engine.speculation import check_guess
from draftkv.flow.steps import StageEvent

QUESTION = [{"role": "user", "content": long_context(300, seed=3) + " what is the magic number?"}]
METHODS = {  # a method that goes through each stage, with its parameters
    "dense": {},
    "speckv": {"budget": 48, "window": 8},
    "specpc": {"prompt_budget": 96, "window": 16, "start_layer": 0},
    "snapkv": {"budget": 48, "window": 8},
}
STAGES = [  # (stage, the method whose flow passes it)
    ("admit", "dense"), ("tokenize", "dense"), ("draft_prefill", "speckv"), ("draft_lookahead", "speckv"),
    ("draft_scoring", "specpc"), ("prompt_selection", "specpc"), ("target_prefill", "dense"), ("probe", "speckv"),
    ("scoring", "snapkv"), ("compression", "snapkv"), ("decode", "dense"), ("stream", "dense"),
]


class Injected(RuntimeError):
    """The failure a test injects."""


def body(method: str, **extra) -> dict:
    return {"model": MODEL, "messages": QUESTION, "max_tokens": 12, "method": method, **METHODS[method], **extra}


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2", max_positions=2048)


@pytest.fixture(scope="module")
def fresh_answers(pair):
    """Each method's answer from a server that never saw a failure."""
    server = serve(pair)
    try:
        return {method: post(server, "/chat/completions", body(method)).json()["choices"][0]["message"]["content"]
                for method in METHODS}
    finally:
        server.stop()


@pytest.fixture(scope="module")
def live(pair):
    server = serve(pair)
    yield server
    server.stop()


def fail_once(stage: str):
    """A hook that raises the first time a batch reaches `stage` (its start, or its end for stages that are
    only timed), then lets everything pass."""
    fired = []

    def hook(event: StageEvent, _jobs) -> None:
        if event.stage == stage and not fired:
            fired.append(event)
            raise Injected(f"injected at {stage}")

    return hook


def assert_internal_error(response: httpx.Response, words: str) -> None:
    assert response.status_code == 500, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "internal"
    assert words in error["message"], error
    assert response.headers["x-request-id"] in error["message"]  # the log line and the answer name the same request


@pytest.mark.parametrize(("stage", "method"), STAGES, ids=[stage for stage, _ in STAGES])
def test_a_failure_at_any_stage_fails_that_request_and_the_next_equals_a_fresh_servers(live, fresh_answers, stage,
                                                                                       method, caplog):
    scheduler = live.app.state.server.scheduler
    scheduler.hook = fail_once(stage)
    try:
        with caplog.at_level(logging.ERROR, logger="draftkv.serve"):
            response = post(live, "/chat/completions", body(method))
        assert_internal_error(response, f"injected at {stage}")
        assert any(record.exc_info and isinstance(record.exc_info[1], Injected) for record in caplog.records)
        assert scheduler.hook.__closure__  # the hook fired once and stays passive
        assert httpx.get(f"{live.root}/health").json()["status"] == "ok"
        again = post(live, "/chat/completions", body(method))
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["message"]["content"] == fresh_answers[method]
        # Every method still answers as a fresh server does: nothing of the failed request was left behind.
        for other in METHODS:
            reply = post(live, "/chat/completions", body(other)).json()
            assert reply["choices"][0]["message"]["content"] == fresh_answers[other], (stage, other)
    finally:
        scheduler.hook = None


SPECULATING = [("speculation_prefill", "dense"), ("draft_decode", "dense"), ("draft_decode", "speckv"),
               ("mid-decode", "dense"), ("mid-decode", "speckv")]


@pytest.mark.parametrize(("stage", "method"), SPECULATING, ids=[f"{s}-{m}" for s, m in SPECULATING])
def test_a_failure_inside_a_speculating_decode_fails_that_request_alone(live, fresh_answers, stage, method,
                                                                         monkeypatch):
    """The draft's caches and the target's rows that a speculating decode holds go with its failure: the next
    speculating request answers as a fresh server does (greedy speculation gives the plain decode's tokens)."""
    scheduler = live.app.state.server.scheduler
    if stage == "mid-decode":  # the target's check of the second round of proposals fails
        checks = []

        def failing(*args, **kwargs):
            checks.append(1)
            if len(checks) == 3:
                raise Injected("injected at mid-decode")
            return check_guess(*args, **kwargs)

        monkeypatch.setattr(speculation, "check_guess", failing)
    else:
        scheduler.hook = fail_once(stage)
    try:
        assert_internal_error(post(live, "/chat/completions", body(method, speculate=3)), f"injected at {stage}")
    finally:
        scheduler.hook = None
        monkeypatch.undo()
    assert httpx.get(f"{live.root}/health").json()["status"] == "ok"
    for other in (method, "dense", "speckv"):
        reply = post(live, "/chat/completions", body(other, speculate=3)).json()
        assert reply["choices"][0]["message"]["content"] == fresh_answers[other], (stage, other)
        assert reply["draftkv"]["proposed_tokens"] > 0


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_the_server_goes_on(live, fresh_answers):
    scheduler = live.app.state.server.scheduler
    seen = []

    def hook(event: StageEvent, _jobs) -> None:
        if event.stage == "stream":
            seen.append(event)
            if len(seen) == 3:
                raise Injected("injected at stream")

    scheduler.hook = hook
    try:
        with httpx.stream("POST", live.url + "/chat/completions", json=body("dense", stream=True), timeout=60) as response:
            events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")
                      and line[5:].strip() != "[DONE]"]
    finally:
        scheduler.hook = None
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    assert fresh_answers["dense"].startswith(text) and text  # what came before the failure is the true answer
    assert "injected at stream" in events[-1]["error"]["message"] and events[-1]["error"]["code"] == "internal"
    assert post(live, "/chat/completions", body("dense")).json()["choices"][0]["message"]["content"] == \
        fresh_answers["dense"]


def test_one_failing_request_fails_alone_and_its_batch_is_run_again_without_it(pair, fresh_answers):
    """Four requests run as one batch; one of them breaks the batch mid-decode, after every row has
    streamed text. It alone gets an error; the others get a fresh server's answers, each piece once."""
    server = serve(pair, max_batch_size=8)
    scheduler = server.app.state.server.scheduler
    release, held = threading.Event(), threading.Event()
    streamed = []

    def poisoned(jobs) -> bool:
        return any(job.request.max_new_tokens == 11 for job in jobs)  # the bad request asks for 11 tokens

    def hook(event: StageEvent, jobs) -> None:
        if event.stage == "tokenize" and event.event == "start" and jobs[0].request.max_new_tokens == 3:
            held.set()
            release.wait(30)  # the first request holds the worker while the four queue behind it
        if event.stage == "stream" and poisoned(jobs):
            streamed.append(len(jobs))
            if len(jobs) == 1 or len(streamed) >= 3 * len(jobs):
                raise Injected("injected: a bad request")

    scheduler.hook = hook
    try:
        with ThreadPoolExecutor(5) as pool:
            first = pool.submit(post, server, "/chat/completions", body("dense", max_tokens=3))
            assert held.wait(30)

            def streamed_answer() -> str:
                with httpx.stream("POST", server.url + "/chat/completions", json=body("dense", stream=True),
                                  timeout=60) as response:
                    chunks = [json.loads(line[5:]) for line in response.iter_lines()
                              if line.startswith("data:") and line[5:].strip() != "[DONE]"]
                return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))

            good = [pool.submit(streamed_answer), pool.submit(streamed_answer),
                    pool.submit(post, server, "/chat/completions", body("dense"))]
            bad = pool.submit(post, server, "/chat/completions", body("dense", max_tokens=11))
            deadline = time.monotonic() + 30
            while scheduler.waiting < 4:
                assert time.monotonic() < deadline, "the four requests did not queue"
                time.sleep(0.02)
            release.set()
            assert first.result().status_code == 200
            assert good[0].result() == good[1].result() == fresh_answers["dense"]
            assert good[2].result().json()["choices"][0]["message"]["content"] == fresh_answers["dense"]
            assert_internal_error(bad.result(), "injected: a bad request")
        assert max(streamed) == 4  # the four did run as one batch, which failed after streaming
        assert metric(server, "draftkv_batch_size_bucket", le="4.0") - metric(server, "draftkv_batch_size_bucket",
                                                                              le="2.0") >= 1
    finally:
        scheduler.hook = None
        release.set()
        server.stop()


def test_a_stopped_worker_is_restarted_and_health_says_so_meanwhile(pair):
    server = serve(pair, api_key="k")
    scheduler = server.app.state.server.scheduler
    try:
        with scheduler.condition:  # stop the worker thread the only way left: as if the process lost it
            scheduler.closed = True
            scheduler.condition.notify_all()
        scheduler.thread.join(10)
        scheduler.closed = False
        assert not scheduler.thread.is_alive()
        health = httpx.get(f"{server.root}/health")
        assert health.status_code == 503 and health.json()["status"] == "restarting"
        health = httpx.get(f"{server.root}/health", headers={"authorization": "Bearer k"})
        assert health.status_code == 200 and health.json()["restarts"] == 1
        assert post(server, "/chat/completions", body("dense"), authorization="Bearer k").status_code == 200
    finally:
        server.stop()


def test_a_request_sent_to_a_stopped_worker_restarts_it(pair, fresh_answers):
    server = serve(pair)
    scheduler = server.app.state.server.scheduler
    try:
        with scheduler.condition:
            scheduler.closed = True
            scheduler.condition.notify_all()
        scheduler.thread.join(10)
        scheduler.closed = False
        reply = post(server, "/chat/completions", body("dense"))
        assert reply.json()["choices"][0]["message"]["content"] == fresh_answers["dense"]
        assert scheduler.restarts == 1
    finally:
        server.stop()


def test_a_failure_in_proxy_mode_fails_that_request_alone(pair):
    from draftkv.models import ModelPair

    upstream = serve(pair)
    proxy = serve(ModelPair(pair.draft, pair.draft), upstream=upstream.url, upstream_model=MODEL, method="specpc",
                  params={"budget": 96, "window": 16, "start_layer": 0})
    scheduler = proxy.app.state.server.scheduler
    try:
        scheduler.hook = fail_once("draft_prefill")
        request = {"model": MODEL, "messages": QUESTION, "max_tokens": 6}
        assert_internal_error(post(proxy, "/chat/completions", request), "injected at draft_prefill")
        fine = post(proxy, "/chat/completions", request)
        assert fine.status_code == 200 and fine.json()["usage"]["kept_prompt_tokens"] < fine.json()["usage"]["prompt_tokens"]
    finally:
        scheduler.hook = None
        proxy.stop()
        upstream.stop()


def test_every_input_that_buys_compute_is_bounded_by_settings_an_operator_can_set(pair):
    server = serve(pair, max_tokens_limit=16, max_guess_tokens=5000, max_logprobs=2, max_body_bytes=4096)
    long = [{"role": "user", "content": long_context(400)}]
    try:
        for path, request, words in [
            ("/chat/completions", {"messages": QUESTION, "max_tokens": 17}, "max_tokens=17 is more than this server "
                                                                             "allows (16, --max-tokens-limit)"),
            ("/completions", {"prompt": "alpha", "max_tokens": 40}, "--max-tokens-limit"),
            ("/chat/completions", {"messages": QUESTION, "max_tokens": 4, "logprobs": True, "top_logprobs": 3},
             "top_logprobs=3 asks for more likeliest tokens than this server lists (2, --max-logprobs)"),
            ("/completions", {"prompt": "alpha", "max_tokens": 4, "logprobs": 5}, "--max-logprobs"),
            # Within the server's guess limit, but past what the model's context leaves after the prompt.
            ("/chat/completions", {"messages": long, "max_tokens": 4, "method": "laq", "budget": 64,
                                   "pseudo_tokens": 1900}, "past the target's context limit of 2048"),
            ("/chat/completions", {"messages": long, "max_tokens": 4, "method": "speckv", "budget": 64,
                                   "lookahead": 1900}, "past the draft's context limit of 2048"),
            ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]},
             "larger than this server's limit of 4,096 bytes"),
        ]:
            response = post(server, path, {"model": MODEL, **request})
            assert response.status_code == 400, (request, response.text)
            assert words in response.json()["error"]["message"], response.json()
        # A body sent in chunks, with no length announced, is cut off at the limit too.
        chunks = (b'{"model": "tiny", "prompt": "' + b"a" * 1000 + b'"' if i == 0 else b" " * 1000 for i in range(6))
        response = httpx.post(server.url + "/completions", content=chunks, headers={"content-type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["code"] == "request_too_large"
        assert post(server, "/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 16}).status_code == 200
    finally:
        server.stop()


def test_an_api_key_guards_every_route_but_health(pair):
    server = serve(pair, api_key="s3cret")
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"},
                        {"authorization": "Basic s3cret"}):
            for verb, path in (("post", "/v1/chat/completions"), ("get", "/v1/models"), ("get", "/metrics"),
                               ("get", "/v1/nothing")):
                response = httpx.request(verb.upper(), server.root + path, headers=headers)
                assert response.status_code == 401, (headers, path)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
                assert "Authorization: Bearer" in error["message"] and "s3cret" not in error["message"]
        assert httpx.get(server.root + "/health").status_code == 200  # load balancers probe without a key
        client = server.client(api_key="s3cret")
        assert client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=3).choices
        assert httpx.get(server.root + "/metrics", headers={"authorization": "bearer s3cret"}).status_code == 200
        import openai

        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="nope").models.list()
    finally:
        server.stop()


@pytest.mark.parametrize(("settings", "words"), [
    ({"timeout": -1}, "--timeout must be a number of seconds > 0, got -1"),
    ({"timeout": float("nan")}, "--timeout must be a number of seconds > 0"),
    ({"upstream_timeout": 0}, "--upstream-timeout must be a number of seconds > 0"),
    ({"memory_limit": -2**30}, "--memory-limit must be a whole number >= 1"),
    ({"max_batch_size": 0}, "--max-batch-size must be a whole number >= 1"),
    ({"max_queue": 0}, "--max-queue must be"),
    ({"max_prompt_tokens": 0}, "--max-prompt-tokens must be"),
    ({"max_tokens": 0}, "--max-tokens must be"),
    ({"max_tokens": 64, "max_tokens_limit": 32}, "--max-tokens (64) is more than --max-tokens-limit (32)"),
    ({"max_logprobs": 21}, "--max-logprobs must be a whole number from 0 to 20"),
    ({"max_guess_tokens": 0}, "--max-guess-tokens must be"),
    ({"temperature": 3}, "--temperature must be a number from 0 to 2"),
    ({"api_key": " "}, "--api-key is empty"),
    ({"upstream": "not-a-url"}, "--upstream 'not-a-url' is not an http(s) URL with a host"),
    ({"upstream": "ftp://host/v1"}, "is not an http(s) URL"),
    ({"upstream": "http://[::1"}, "is not a URL"),
])
def test_settings_are_checked_when_made(settings, words):
    from draftkv.errors import ConfigError
    from draftkv.serving import ServeSettings

    with pytest.raises(ConfigError) as raised:
        ServeSettings(**settings)
    assert words in str(raised.value)


@pytest.mark.parametrize(("content_type", "encoded"), [
    ("text/plain", lambda data: {"content": json.dumps(data)}),
    ("application/x-www-form-urlencoded", lambda data: {"data": {json.dumps(data): ""}}),
    ("multipart/form-data", lambda data: {"files": {"body": ("body.json", json.dumps(data), "application/json")}}),
    (None, lambda data: {"content": json.dumps(data)}),
])
def test_a_web_page_cannot_drive_the_server(pair, content_type, encoded):
    """What a browser sends cross-site without a preflight (text/plain, a form, multipart) is refused before
    the body is read; no CORS headers answer a page's origin, and its preflight finds no route."""
    server = serve(pair)
    try:
        data = {"model": MODEL, "messages": QUESTION, "max_tokens": 3}
        headers = {"origin": "https://evil.example", **({"content-type": content_type} if content_type else {})}
        options = encoded(data)
        if content_type == "multipart/form-data":
            headers.pop("content-type")  # httpx writes it with the boundary
        response = httpx.post(server.url + "/chat/completions", headers=headers, **options)
        assert response.status_code == 415, response.text
        assert response.json()["error"]["code"] == "unsupported_media_type"
        assert "Content-Type: application/json" in response.json()["error"]["message"]
        assert not any(name.startswith("access-control-") for name in response.headers)
        preflight = httpx.options(server.url + "/chat/completions", headers={
            "origin": "https://evil.example", "access-control-request-method": "POST",
            "access-control-request-headers": "content-type"})
        assert preflight.status_code == 405 and "access-control-allow-origin" not in preflight.headers
        assert metric(server, "draftkv_requests_total", status="200") == 0  # nothing ran
        sent = post(server, "/chat/completions", data, origin="https://evil.example")  # JSON: a preflight guards it
        assert sent.status_code == 200 and "access-control-allow-origin" not in sent.headers
    finally:
        server.stop()


def test_allowed_origins_get_cors_answers_and_others_none(pair):
    server = serve(pair, allow_origins=("https://app.example.com",), api_key="s3cret")
    try:
        asked = {"access-control-request-method": "POST", "access-control-request-headers": "authorization,content-type"}
        preflight = httpx.options(server.url + "/chat/completions", headers={"origin": "https://app.example.com", **asked})
        assert preflight.status_code == 200  # no key needed to ask
        assert preflight.headers["access-control-allow-origin"] == "https://app.example.com"
        refused = httpx.options(server.url + "/chat/completions", headers={"origin": "https://evil.example", **asked})
        assert "access-control-allow-origin" not in refused.headers
        sent = post(server, "/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 3},
                    origin="https://app.example.com", authorization="Bearer s3cret")
        assert sent.status_code == 200 and sent.headers["access-control-allow-origin"] == "https://app.example.com"
    finally:
        server.stop()


def test_health_tells_the_model_and_queue_only_to_the_key(pair):
    for key in (None, "s3cret"):
        server = serve(pair, **({"api_key": key} if key else {}))
        try:
            assert httpx.get(server.root + "/health").json() == {"status": "ok"}
            assert httpx.get(server.root + "/health", headers={"authorization": "Bearer wrong"}).json() == {"status": "ok"}
            if key:
                told = httpx.get(server.root + "/health", headers={"authorization": f"Bearer {key}"}).json()
                assert told == {"status": "ok", "mode": "local", "model": MODEL, "waiting": 0, "running": 0,
                                "restarts": 0}
        finally:
            server.stop()


@pytest.mark.parametrize(("method", "params", "slowed", "pause"), [
    ("dense", {}, "target", 0.4),  # one long prefill
    ("kvzip", {"budget": 48, "chunk": 8}, "target", 0.02),  # ~38 reconstruction probes
    ("speckv", {"budget": 48, "lookahead": 300}, "draft", 0.02),  # a long lookahead
    ("laq", {"budget": 48, "pseudo_tokens": 300}, "target", 0.02),  # a long pseudo-answer
])
def test_a_request_past_its_deadline_frees_the_worker_within_one_layer(pair, method, params, slowed, pause):
    """Every layer of the slowed model waits `pause` first; the request's 0.5 s run out inside a long stage,
    which stops at the next layer (the one that finds it late), not at the stage's end."""
    calls: list[float] = []

    def slow(_module, _args) -> None:
        calls.append(time.monotonic())
        time.sleep(pause)

    model = getattr(pair, slowed).model
    handles = [layer.register_forward_pre_hook(slow) for layer in model.model.layers]
    server = serve(pair, timeout=0.5)
    jobs = []
    scheduler = server.app.state.server.scheduler
    submit = scheduler.submit
    scheduler.submit = lambda job: (jobs.append(job), submit(job))[1]
    try:
        response = post(server, "/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 4,
                                                      "method": method, **params})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        waited = time.monotonic() + 5
        while scheduler.running:
            assert time.monotonic() < waited, "the worker is still busy with a request past its deadline"
            time.sleep(0.01)
        late = [at for at in calls if at > jobs[0].deadline]
        assert len(late) <= 1, f"{len(late)} layers ran after the deadline"
        for handle in handles:
            handle.remove()
        handles = []
        assert post(server, "/chat/completions", body("dense")).status_code == 200  # the worker is free
    finally:
        for handle in handles:
            handle.remove()
        server.stop()


@pytest.mark.parametrize(("params", "limits", "param", "words"), [
    ({"chunk": 1}, {}, "chunk", "probes (its chunk), more than this server's limit of 64 (--max-probes)"),
    ({"instruction": "x" * 600}, {}, "instruction", "more than this server's limit of 512 (--max-guess-tokens)"),
    ({"instruction": "x" * 1900}, {"max_guess_tokens": 4096}, "instruction",
     "pass the target's context limit of 2048 tokens"),
])
def test_kvzip_probes_are_bounded_before_admission(pair, params, limits, param, words):
    server = serve(pair, **limits)
    calls = []
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in pair.target.model.model.layers]
    try:
        response = post(server, "/chat/completions", {"model": MODEL, "messages": QUESTION, "max_tokens": 4,
                                                      "method": "kvzip", "budget": 48, **params})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == param and words in error["message"], error
        assert not calls  # refused before the model read anything
    finally:
        for handle in handles:
            handle.remove()
        server.stop()


def test_the_library_refuses_kvzip_probes_past_the_context(pair):
    import draftkv
    from draftkv.errors import PromptError

    with pytest.raises(PromptError, match="reads the prompt back in probes of up to .* instruction"):
        draftkv.generate(pair, messages=QUESTION, method="kvzip", budget=48, instruction="x" * 1900,
                         max_new_tokens=2)


def test_a_huge_prompt_is_refused_by_its_length_before_any_tokenizer_reads_it(pair):
    server = serve(pair, max_prompt_tokens=1000)
    scheduler = server.app.state.server.scheduler
    read: list[tuple[int, str]] = []  # (characters, thread) of each prompt the handlers' tokenizer read
    tokenizer = scheduler.tokenizer
    encode = tokenizer.apply_chat_template

    def spy(messages, *args, **kwargs):
        read.append((sum(len(m["content"]) for m in messages), threading.current_thread().name))
        return encode(messages, *args, **kwargs)

    tokenizer.apply_chat_template = spy
    try:
        huge = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 4_000_000}], "max_tokens": 3}
        with ThreadPoolExecutor(2) as pool:
            refused = pool.submit(post, server, "/chat/completions", huge)
            small = pool.submit(post, server, "/chat/completions", body("dense"))
            assert small.result().status_code == 200
            response = refused.result()
        assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"
        assert "20,000,000 characters, more than this server's limit of 1000 tokens can hold" in response.json()["error"]["message"]
        assert all(characters < 1_000_000 for characters, _ in read)  # the huge prompt was never tokenized
        # A prompt within the bound is counted by the handlers, not by the worker, and refused by its tokens.
        long = {"model": MODEL, "messages": [{"role": "user", "content": long_context(1500)}], "max_tokens": 3}
        response = post(server, "/chat/completions", long)
        assert response.status_code == 400 and "tokens, more than this server's limit of 1000" in response.text
        assert read and all(thread != "draftkv-worker" for _, thread in read)
    finally:
        server.stop()
