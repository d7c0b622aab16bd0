"""The OpenAI-compatible HTTP server: local mode (draft and target here) and proxy mode (the draft
here compresses the prompt; an upstream OpenAI-compatible engine answers it)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import DraftKVError, UnknownMethodError
from ..inspection import Inspection
from ..methods import Method, method_with_budgets
from ..types import Request as DraftRequest
from ..types import Result, Sampling, TokenLogprob, is_int
from . import protocol
from .engine import Job, Limits, Scheduler, check_proxy_method, run_local, run_proxy
from .protocol import ChatRequest, Common, CompletionRequest, ServeError, sse
from .settings import ServeSettings
from .tokens import TokenTexts

if TYPE_CHECKING:
    from ..compress import CompressedPrompt
    from ..likelihood import Scored
    from ..models import ModelPair

log = logging.getLogger("draftkv.serve")
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    """Prometheus counters and histograms, in a registry of this app's own."""

    def __init__(self, scheduler: Scheduler):
        self.registry = registry = CollectorRegistry()
        self.requests = Counter("draftkv_requests", "Requests answered, by endpoint, method and HTTP status",
                                ["endpoint", "method", "status"], registry=registry)
        self.prompt_tokens = Counter("draftkv_prompt_tokens", "Prompt tokens received, before compression",
                                     registry=registry)
        self.kept_tokens = Counter("draftkv_kept_prompt_tokens", "Prompt tokens the target read, after compression",
                                   registry=registry)
        self.completion_tokens = Counter("draftkv_completion_tokens", "Tokens generated", registry=registry)
        self.latency = Histogram("draftkv_request_latency_seconds", "Time from request to last byte",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.first_token = Histogram("draftkv_time_to_first_token_seconds", "Time from request to first token",
                                     ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_size = Histogram("draftkv_batch_size", "Requests per batch the worker ran",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry)
        scheduler.on_batch = self.batch_size.observe
        Gauge("draftkv_requests_waiting", "Requests in the queue", registry=registry).set_function(
            lambda: scheduler.waiting)
        Gauge("draftkv_requests_running", "Requests in the running batch", registry=registry).set_function(
            lambda: scheduler.running)


@dataclass
class Trace:
    """One request's numbers, recorded in the metrics and logged as one JSON line when it ends."""

    metrics: Metrics
    endpoint: str
    request_id: str = "-"
    started: float = field(default_factory=time.monotonic)
    method: str = "-"
    status: int = 200
    prompt_tokens: int = 0
    kept_prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token: float | None = None  # seconds after the start
    closed: bool = False

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic() - self.started

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        latency = time.monotonic() - self.started
        m = self.metrics
        m.requests.labels(self.endpoint, self.method, str(self.status)).inc()
        m.latency.labels(self.endpoint).observe(latency)
        if self.status in (200, 499):  # a client that left still had its prompt read and its tokens sent
            m.prompt_tokens.inc(self.prompt_tokens)
            m.kept_tokens.inc(self.kept_prompt_tokens)
            m.completion_tokens.inc(self.completion_tokens)
        if self.status == 200 and self.first_token is not None:
            m.first_token.labels(self.endpoint).observe(self.first_token)
        log.info(json.dumps({
            "event": "request", "id": self.request_id, "endpoint": self.endpoint, "method": self.method,
            "status": self.status,
            "prompt_tokens": self.prompt_tokens, "kept_prompt_tokens": self.kept_prompt_tokens,
            "completion_tokens": self.completion_tokens, "latency_s": round(latency, 4),
            "first_token_s": None if self.first_token is None else round(self.first_token, 4),
        }))


class ClientGone(Exception):
    """The client closed the connection; nobody reads the answer."""


def error_response(error: ServeError, request_id: str | None = None) -> JSONResponse:
    headers = {"x-request-id": request_id} if request_id else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def usage(result: Result) -> dict:
    stats = result.stats
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
            "total_tokens": stats.prompt_tokens + stats.new_tokens, "kept_prompt_tokens": stats.kept_prompt_tokens,
            "dtype": stats.dtype}


def shown_logprobs(tokens: TokenTexts, result: Result) -> list[TokenLogprob]:
    """The generated tokens' log-probabilities, up to the text shown (a stop string's tokens are cut with it)."""
    entries = result.logprobs or []
    starts = tokens.offsets([entry.token_id for entry in entries], special=False)
    return [entry for entry, start in zip(entries, starts, strict=True) if start < len(result.text)]


def completion_logprobs(tokens: TokenTexts, result: Result, prompt: tuple[list[int], Scored] | None,
                        top: int) -> dict:
    """OpenAI's completion logprobs: every token's text, log-probability, likeliest alternatives (the chosen
    one among them) and its offset in the returned text; with echo, the prompt's tokens first (the first
    has none). A token that is not whole characters is written "bytes:\\xNN..."."""
    entries: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
    offsets: list[int] = []
    start = 0
    if prompt is not None:
        ids, scored = prompt
        entries.append((ids[0], None, None))
        entries += list(zip(ids[1:], scored.logprobs, scored.top or [[] for _ in ids[1:]], strict=True))
        offsets = tokens.offsets(ids)
        start = len(tokens.decode(ids))
    shown = shown_logprobs(tokens, result)
    entries += [(t.token_id, t.logprob, t.top) for t in shown]
    offsets += tokens.offsets([t.token_id for t in shown], special=False, start=start)
    texts, token_logprobs, top_logprobs = [], [], []
    for token, logprob, likeliest in entries:
        piece = tokens.text(token)
        texts.append(piece)
        token_logprobs.append(logprob)
        if likeliest is None:
            top_logprobs.append(None)
        else:
            top_logprobs.append({**{tokens.text(i): v for i, v in likeliest[:top]}, piece: logprob})
    return {"tokens": texts, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokens: TokenTexts, result: Result) -> dict:
    """OpenAI's chat logprobs: per generated token, its text, its own bytes, log-probability and alternatives."""
    def entry(token: int, logprob: float) -> dict:
        return {"token": tokens.text(token), "logprob": logprob, "bytes": list(tokens.bytes(token))}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]}
                        for t in shown_logprobs(tokens, result)]}


def draftkv_stats(method: Method, result: Result) -> dict:
    stats = result.stats
    return {"method": method.name, "params": method.params(), "dtype": stats.dtype, "prompt_tokens": stats.prompt_tokens,
            "kept_prompt_tokens": stats.kept_prompt_tokens, "kv_entries": stats.kv_entries, "kv_bytes": stats.kv_bytes,
            "kv_bytes_dense": stats.kv_bytes_dense, "lookahead_tokens": stats.lookahead_tokens,
            "accepted_guess_tokens": stats.accepted_guess_tokens, "speculation_rounds": stats.speculation_rounds,
            "proposed_tokens": stats.proposed_tokens, "accepted_proposals": stats.accepted_proposals,
            "draft_kv_bytes": stats.draft_kv_bytes,
            "time_to_first_token": stats.time_to_first_token,
            "total_time": stats.total_time, "timings": stats.timings, "note": stats.note}


CLIENT_POLL = 0.1  # seconds between looks at whether a waiting client is still there (a stop waits for it)


def check_json_body(http: Request) -> None:
    """A completion's body must be declared JSON. Browsers send a form, multipart or text/plain body to any
    site without asking it first (no CORS preflight), so accepting those would let any web page drive a
    local server; JSON needs the preflight, which this server answers only for --allow-origin."""
    media_type = http.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "application/json":
        shown = f"Content-Type {media_type!r}" if media_type else "no Content-Type"
        raise ServeError(415, f"the request body must be JSON sent with 'Content-Type: application/json'; it came "
                         f"with {shown}", code="unsupported_media_type")


async def read_body(http: Request, limit: int) -> bytes:
    """The request body, refused once it passes `limit` bytes (before it is all read)."""
    declared = http.headers.get("content-length", "")
    too_large = ServeError(400, f"the request body is larger than this server's limit of {limit:,} bytes "
                           "(--max-body-bytes)", code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class Server:
    """The routes' state: settings, the scheduler, metrics and (proxy mode) the upstream client."""

    def __init__(self, pair: ModelPair, settings: ServeSettings):
        self.pair, self.settings = pair, settings
        if settings.proxy:
            check_proxy_method(self.method_for(None, {}))
        else:
            self.method_for(None, {})  # fail at start on a bad server-wide method
        limits = Limits(settings.max_prompt_tokens, settings.max_tokens_limit, settings.max_guess_tokens,
                        settings.max_probes)
        self.scheduler = Scheduler(pair, run_proxy if settings.proxy else run_local,
                                   max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                                   limits=limits, memory_limit=settings.memory_limit)
        self.metrics = Metrics(self.scheduler)
        self.model_name = settings.model_name or (settings.upstream_model if settings.proxy else pair.target.name)
        self.tokens = TokenTexts(pair.tokenizer)
        self.upstream: httpx.AsyncClient | None = None
        self.settling: set[asyncio.Task] = set()  # disconnected streams waiting for their request to stop

    # ---- requests -> draftkv ----

    def method_for(self, name: str | None, given: dict[str, Any]) -> Method:
        """The request's method: its own name and parameters, else the server's defaults."""
        name = name or self.settings.method
        params = dict(self.settings.params) if name == self.settings.method else {}
        if given.keys() & {"budget", "prompt_budget", "compression_ratio"}:  # the request's budgets replace the server's
            params.pop("budget", None)
            params.pop("prompt_budget", None)
            params.pop("compression_ratio", None)
        params.update(given)
        try:
            return method_with_budgets(name, **params)
        except UnknownMethodError as error:
            raise ServeError(400, str(error), param="method", code="unknown_method") from None
        except DraftKVError as error:
            raise ServeError(400, str(error), code="invalid_parameter") from None

    def draft_request(self, parsed: Common) -> tuple[DraftRequest, Method]:
        given = parsed.method_params()
        given.update({name: getattr(parsed, name) for name in ("budget", "prompt_budget", "compression_ratio")
                      if getattr(parsed, name) is not None})
        method = self.method_for(parsed.method, given)
        if self.settings.proxy:
            check_proxy_method(method)
        temperature = parsed.temperature if parsed.temperature is not None else self.settings.temperature
        logprobs = parsed.wanted_logprobs()
        if logprobs is not None and logprobs > self.settings.max_logprobs:
            name = "top_logprobs" if isinstance(parsed, ChatRequest) else "logprobs"
            raise ServeError(400, f"{name}={logprobs} asks for more likeliest tokens than this server lists "
                             f"({self.settings.max_logprobs}, --max-logprobs)", param=name, code="invalid_value")
        if self.settings.proxy:
            logprobs = None  # the upstream's own
        if parsed.stream and logprobs is not None:
            raise ServeError(400, "logprobs are returned with whole responses only: leave out stream or logprobs",
                             param="logprobs", code="unsupported_parameter")
        if isinstance(parsed, ChatRequest):
            max_new = parsed.max_completion_tokens or parsed.max_tokens or self.settings.default_max_tokens
        else:
            max_new = parsed.max_tokens or self.settings.default_max_tokens
        limit = self.settings.max_tokens_limit
        if limit is not None and max_new > limit:
            raise ServeError(400, f"max_tokens={max_new} is more than this server allows ({limit}, "
                             "--max-tokens-limit); ask for fewer", param="max_tokens", code="invalid_value")
        if parsed.speculate and self.settings.proxy:
            raise ServeError(400, "speculate decodes with the target, which the upstream runs in proxy mode; leave "
                             "it out", param="speculate", code="unsupported_parameter")
        if parsed.inspect and self.settings.proxy:
            raise ServeError(400, "inspect reports what the target kept, which the upstream runs in proxy mode; "
                             "leave it out", param="inspect", code="unsupported_parameter")
        try:
            sampling = Sampling(temperature, parsed.top_p or 1.0, parsed.top_k or 0, parsed.seed)
            if isinstance(parsed, ChatRequest):
                return DraftRequest(messages=parsed.chat(), max_new_tokens=max_new, sampling=sampling,
                                    stop=parsed.stops(), logprobs=logprobs, speculate=parsed.speculate), method
            if parsed.echo and parsed.stream:
                raise ServeError(400, "echo is returned with whole responses only: leave out stream or echo",
                                 param="echo", code="unsupported_parameter")
            if parsed.echo and self.settings.proxy and method.compresses_prompt:
                raise ServeError(400, f"echo through the proxy would return the prompt that {method.name} kept for "
                                 "the upstream, not yours; leave out echo, or send method dense to pass the "
                                 "prompt through", param="echo", code="unsupported_parameter")
            prompt = parsed.one()
            if isinstance(prompt, list):
                self.check_token_ids(prompt)
            return DraftRequest(context=prompt if isinstance(prompt, str) else "",
                                prompt_ids=prompt if isinstance(prompt, list) else None, chat_template=False,
                                sampling=sampling, stop=parsed.stops(), logprobs=logprobs,
                                max_new_tokens=max_new, speculate=parsed.speculate), method
        except DraftKVError as error:
            raise ServeError(400, str(error), code="invalid_request") from None

    def check_token_ids(self, ids: list[int]) -> None:
        vocabulary = len(self.pair.tokenizer)
        if bad := [token for token in ids if not 0 <= token < vocabulary]:
            raise ServeError(400, f"the prompt holds token id {bad[0]}; token ids of this model are 0 to "
                             f"{vocabulary - 1}", param="prompt", code="invalid_prompt")

    def check_model(self, model: str) -> None:
        if self.settings.proxy and self.settings.upstream_model is None:
            return  # any model: the upstream decides
        if model != self.model_name:
            raise ServeError(404, f"model {model!r} is not served here; this server serves {self.model_name!r}",
                             param="model", code="model_not_found")

    # ---- waiting for the worker ----

    async def submit(self, request: DraftRequest, method: Method, request_id: str) -> Job:
        """Queue a request for the worker, its prompt counted first here, in a thread of its own: a long
        prompt is tokenized (or refused by its length) without holding up the worker or the event loop."""
        deadline = time.monotonic() + self.settings.timeout
        tokens = await asyncio.to_thread(self.scheduler.count_tokens, request)
        job = Job(request, method, asyncio.get_running_loop(), deadline, request_id=request_id, prompt_tokens=tokens)
        self.scheduler.submit(job)
        return job

    async def next_event(self, job: Job, http: Request | None = None) -> tuple[str, Any]:
        """The job's next event; raises its ServeError, a 504 when its time runs out, or ClientGone."""
        while True:
            remaining = job.deadline - time.monotonic()
            if remaining <= 0:
                job.cancelled = True
                raise ServeError(504, f"the request took longer than this server's timeout of "
                                 f"{self.settings.timeout:g} s", code="timeout")
            try:
                kind, value = await asyncio.wait_for(job.events.get(), min(remaining, CLIENT_POLL))
            except asyncio.TimeoutError:
                if http is not None and await http.is_disconnected():
                    job.cancelled = True
                    raise ClientGone from None
                continue
            if kind == "error":
                raise value
            return kind, value

    async def admitted(self, job: Job, http: Request, trace: Trace) -> None:
        await self.next_event(job, http)  # the first event is "admitted" (or the error that refused it)
        trace.prompt_tokens = job.prompt_tokens

    def settle(self, job: Job, trace: Trace, sent: str) -> None:
        """A stream whose client left: once its request stops, log and count the tokens that reached the
        client (the text sent), then close its trace."""
        async def wait() -> None:
            try:
                while (event := await self.next_event(job))[0] != "done":
                    pass
                result = event[1]
                self.account(trace, result)
                ids = result.token_ids
                ends = self.tokens.offsets(ids, special=False)[1:] + [len(self.tokens.decode(ids, special=False))]
                trace.completion_tokens = sum(end <= len(sent) for end in ends) if sent else 0
            except ServeError:
                pass
            finally:
                trace.close()

        task = asyncio.get_running_loop().create_task(wait())
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)

    # ---- local mode ----

    def report(self, parsed: Common, request: DraftRequest, method: Method, result: Result) -> dict:
        """The draftkv block of a reply: the stats, and with `inspect` what was kept of each prompt token."""
        block = draftkv_stats(method, result)
        if parsed.inspect:
            block["inspect"] = Inspection.of_result(self.pair, request, method, result).to_dict()
        return block

    async def local(self, http: Request, parsed: Common, trace: Trace) -> Any:
        request, method = self.draft_request(parsed)
        trace.method = method.name
        chat = isinstance(parsed, ChatRequest)
        job = await self.submit(request, method, trace.request_id)
        echo = not chat and parsed.echo
        if echo and request.logprobs is not None:
            job.prompt_logprobs = request.logprobs
        await self.admitted(job, http, trace)
        reply = Reply(chat, trace.request_id, protocol.now(), self.model_name)
        if not parsed.stream:
            while (event := await self.next_event(job, http))[0] != "done":
                pass
            result = event[1]
            self.account(trace, result)
            prompt_text = ""
            if job.prompt_scores is not None:  # echo with logprobs: the prompt's tokens as the model read them
                prompt_text = self.tokens.decode(job.prompt_scores[0])
            elif echo:
                prompt_text = request.context or self.tokens.decode(request.prompt_ids or [])
            logprobs = None
            if request.logprobs is not None:
                logprobs = (chat_logprobs(self.tokens, result) if chat
                            else completion_logprobs(self.tokens, result, job.prompt_scores, request.logprobs))
            return JSONResponse({**reply.whole(prompt_text + result.text, result.finish_reason, logprobs),
                                 "usage": usage(result), "draftkv": self.report(parsed, request, method, result)},
                                headers={"x-request-id": trace.request_id})

        async def stream() -> AsyncIterator[str]:
            ended = False
            sent = ""
            try:
                if chat:
                    yield sse(reply.chunk({"role": "assistant", "content": ""}))
                while True:
                    kind, value = await self.next_event(job)
                    if kind == "text":
                        trace.mark_first_token()
                        yield sse(reply.chunk(value))
                        sent += value
                    elif kind == "done":
                        self.account(trace, value)
                        yield sse(reply.chunk("" if not chat else {}, value.finish_reason))
                        if parsed.include_usage:
                            yield sse({**reply.chunk(None), "choices": [], "usage": usage(value),
                                       "draftkv": self.report(parsed, request, method, value)})
                        ended = True
                        yield sse("[DONE]")
                        return
            except ServeError as error:
                ended = True
                trace.status = error.status
                yield sse(error.body())
            except Exception as error:  # a fault of this stream ends it with an error event
                ended = True
                trace.status = 500
                yield sse(ServeError.internal(trace.request_id, error).body())
            finally:
                job.cancelled = True  # a no-op when it finished; stops decoding when the client left
                if ended:
                    trace.close()
                else:
                    trace.status = 499  # the client closed the stream
                    self.settle(job, trace, sent)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"x-request-id": trace.request_id})

    @staticmethod
    def account(trace: Trace, result: Result) -> None:
        stats = result.stats
        trace.prompt_tokens, trace.kept_prompt_tokens = stats.prompt_tokens, stats.kept_prompt_tokens
        trace.completion_tokens = stats.new_tokens
        if trace.first_token is None:  # from the request's arrival: the decode time is what came after it
            trace.first_token = time.monotonic() - trace.started - (stats.total_time - stats.time_to_first_token)

    # ---- proxy mode ----

    async def proxy(self, http: Request, parsed: Common, raw: dict, trace: Trace) -> Any:
        request, method = self.draft_request(parsed)
        trace.method = method.name
        chat = isinstance(parsed, ChatRequest)
        ours = protocol.DRAFTKV_FIELDS | set(parsed.method_params())  # what the upstream would not understand
        body = {key: value for key, value in raw.items() if key not in ours}
        if self.settings.upstream_model:
            body["model"] = self.settings.upstream_model
        compressed: CompressedPrompt | None = None
        if method.compresses_prompt or method.compresses_kv:
            job = await self.submit(request, method, trace.request_id)
            await self.admitted(job, http, trace)
            _, compressed = await self.next_event(job, http)
            if chat:
                body["messages"] = [*raw["messages"][:-1], {**raw["messages"][-1], "content": compressed.text}]
            else:  # token ids go on as token ids, text as text
                body["prompt"] = compressed.token_ids if request.prompt_ids is not None else compressed.text
            trace.prompt_tokens = compressed.prompt_tokens
        if parsed.stream:
            body["stream_options"] = {"include_usage": True}  # for the kept-token count; passed on only if asked
        url = self.settings.upstream.rstrip("/") + ("/chat/completions" if chat else "/completions")
        headers = {"Authorization": f"Bearer {self.settings.upstream_api_key}"} if self.settings.upstream_api_key else {}
        extra = {"method": method.name, "params": method.params()}
        if compressed is not None:
            extra.update(prompt_tokens=compressed.prompt_tokens, kept_prompt_tokens=compressed.kept_tokens,
                         timings=compressed.timings)

        def merged(upstream_usage: Any) -> dict:
            upstream_usage = dict(upstream_usage or {})
            kept = upstream_usage.get("prompt_tokens", 0)
            trace.kept_prompt_tokens = kept
            trace.completion_tokens = upstream_usage.get("completion_tokens", 0)
            if compressed is None:
                trace.prompt_tokens = kept
            return {**upstream_usage, "prompt_tokens": trace.prompt_tokens, "kept_prompt_tokens": kept,
                    "total_tokens": trace.prompt_tokens + trace.completion_tokens}

        client = self.upstream_client()
        try:
            response = await client.send(client.build_request("POST", url, json=body, headers=headers),
                                         stream=parsed.stream)
        except httpx.HTTPError as error:
            raise upstream_failure(url, error) from None
        if not 200 <= response.status_code < 300:
            await response.aread()
            await response.aclose()
            raise upstream_refusal(url, response)
        if not parsed.stream:
            try:
                data = upstream_object(url, response.content, "response")
            finally:
                await response.aclose()
            data["usage"] = merged(data.get("usage"))
            data["draftkv"] = extra
            trace.mark_first_token()
            return JSONResponse(data, headers={"x-request-id": trace.request_id})

        async def stream() -> AsyncIterator[str]:
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = upstream_object(url, data.encode(), "stream chunk")
                    if chunk.get("usage") and not chunk.get("choices"):
                        chunk["usage"] = merged(chunk["usage"])
                        if parsed.include_usage:
                            yield sse({**chunk, "draftkv": extra})
                        continue
                    if not parsed.include_usage:
                        chunk.pop("usage", None)
                    if any((c.get("delta") or {}).get("content") or c.get("text") for c in chunk.get("choices", [])):
                        trace.mark_first_token()  # the first chunk with text (not the role chunk)
                    yield sse(chunk)
                yield sse("[DONE]")
            except ServeError as failure:
                trace.status = failure.status
                yield sse(failure.body())
            except httpx.HTTPError as error:
                failure = upstream_failure(url, error)
                trace.status = failure.status
                yield sse(failure.body())
            except Exception as error:  # a fault of this stream ends it with an error event
                trace.status = 500
                yield sse(ServeError.internal(trace.request_id, error).body())
            finally:
                await response.aclose()
                trace.close()

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"x-request-id": trace.request_id})

    def upstream_client(self) -> httpx.AsyncClient:
        if self.upstream is None:  # redirects are not followed: a 3xx is answered as a failure
            self.upstream = httpx.AsyncClient(timeout=httpx.Timeout(self.settings.upstream_timeout, connect=10.0),
                                              follow_redirects=False)
        return self.upstream

    # ---- the route ----

    async def complete(self, http: Request, kind: type[Common], endpoint: str) -> Any:
        trace = Trace(self.metrics, endpoint, protocol.new_id("chatcmpl" if kind is ChatRequest else "cmpl"))
        streaming = False
        try:
            check_json_body(http)
            raw = await read_body(http, self.settings.max_body_bytes)
            parsed, body = protocol.parse(kind, raw)
            self.check_model(parsed.model)
            if self.settings.proxy:
                response = await self.proxy(http, parsed, body, trace)
            else:
                response = await self.local(http, parsed, trace)
            streaming = isinstance(response, StreamingResponse)
            return response
        except ServeError as error:
            trace.status = error.status
            return error_response(error, trace.request_id)
        except ClientGone:
            trace.status = 499
            return JSONResponse({}, status_code=499)
        except Exception as error:  # a fault answering one request is that request's 500
            trace.status = 500
            return error_response(ServeError.internal(trace.request_id, error), trace.request_id)
        finally:
            if not streaming:  # a stream closes its trace when it ends
                trace.close()


@dataclass
class Reply:
    """Response bodies of one request, in the chat or the completion shape."""

    chat: bool
    id: str
    created: int
    model: str

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, logprobs: dict | None = None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason,
                      "logprobs": logprobs}
            return {**self.head("chat.completion"), "choices": [choice]}
        return {**self.head("text_completion"),
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}

    def chunk(self, delta: str | dict | None, finish_reason: str | None = None) -> dict:
        if self.chat:
            content = delta if isinstance(delta, dict) else {"content": delta}
            choice = {"index": 0, "delta": content, "finish_reason": finish_reason}
            return {**self.head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta or "", "finish_reason": finish_reason, "logprobs": None}
        return {**self.head("text_completion"), "choices": [choice]}


def upstream_failure(url: str, error: Exception) -> ServeError:
    if isinstance(error, httpx.TimeoutException):
        return ServeError(504, f"the upstream {url} did not answer in time: {error!r}", code="upstream_timeout")
    if isinstance(error, httpx.ConnectError):
        return ServeError(502, f"the upstream {url} is unreachable: {error}", code="upstream_unreachable")
    return ServeError(502, f"the upstream {url} failed: {type(error).__name__}: {error}", code="upstream_error")


def upstream_refusal(url: str, response: httpx.Response) -> ServeError:
    """A status other than 2xx: a redirect (not followed) or the upstream's own error."""
    if 300 <= response.status_code < 400:
        return ServeError(502, f"the upstream {url} answered {response.status_code}, a redirect to "
                          f"{response.headers.get('location', 'nowhere')!r}, which is not followed; give --upstream "
                          "as the address it redirects to", code="upstream_error")
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    status = response.status_code if 400 <= response.status_code < 500 else 502
    return ServeError(status, f"the upstream answered {response.status_code}: {message}", code="upstream_error")


def refuse_constant(constant: str) -> float:
    """NaN and Infinity: Python's JSON reader takes them, JSON does not."""
    raise ValueError(constant)


def upstream_object(url: str, content: bytes, what: str) -> dict:
    """An upstream's response or stream chunk, checked to be an OpenAI completion object; anything else
    is a 502 that says what the upstream sent."""
    def bad(reason: str) -> ServeError:
        shown = content[:200].decode("utf-8", "replace")
        return ServeError(502, f"the upstream {url} sent a {what} that is not an OpenAI completion: {reason} "
                          f"(it began {shown!r})", code="upstream_error")

    try:
        data = json.loads(content, parse_constant=refuse_constant)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # what is passed on must render again
    except (ValueError, RecursionError, UnicodeEncodeError) as error:
        reason = ("it holds text that is not valid Unicode" if isinstance(error, UnicodeEncodeError)
                  else f"it holds {error}, which is not JSON" if str(error) in ("NaN", "Infinity", "-Infinity")
                  else "not JSON" if content.strip() else "it was empty")
        raise bad(reason) from None
    if not isinstance(data, dict):
        raise bad(f"a JSON {type(data).__name__}, not an object")
    if not isinstance(data.get("choices", []), list) or not all(isinstance(c, dict) for c in data.get("choices", [])):
        raise bad("its choices are not a list of objects")
    usage_ = data.get("usage")
    if usage_ is not None and (not isinstance(usage_, dict) or not all(
            is_int(usage_.get(name, 0)) and usage_.get(name, 0) >= 0
            for name in ("prompt_tokens", "completion_tokens", "total_tokens"))):
        raise bad("its usage is not an object of token counts")
    return data


def has_key(authorization: bytes, key: bytes) -> bool:
    """Does an Authorization header carry "Bearer <key>"? Compared in constant time."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class RequireKey:
    """Every route but /health needs "Authorization: Bearer <key>" (compared in constant time); others
    get 401 in OpenAI's error shape. A plain ASGI middleware, so streams and disconnects pass as they are."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health" \
                and not has_key(dict(scope.get("headers") or []).get(b"authorization", b""), self.key):
            error = ServeError(401, "a valid API key is needed: send the header 'Authorization: Bearer <key>' "
                               "with the key this server was started with", code="invalid_api_key")
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def body_schema(kind: type[Common], model_name: str | None) -> dict:
    """The OpenAPI request body of a completion route, from its request model (for clients and fuzzers),
    with the model's definitions written in place (OpenAPI resolves none under "$defs") and the one model
    name served (None: any, the upstream decides)."""
    schema = kind.model_json_schema()
    definitions = schema.pop("$defs", {})
    if model_name is not None:
        schema["properties"]["model"]["enum"] = [model_name]

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def create_app(pair: ModelPair, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app. Local mode needs the target (and a draft for draft methods); proxy mode
    (settings.upstream) needs only the draft, given as both models of the pair."""
    server = Server(pair, settings or ServeSettings())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        yield
        server.scheduler.close()
        if server.upstream is not None:
            await server.upstream.aclose()

    app = FastAPI(title="draftkv", lifespan=lifespan)
    app.state.server = server
    if server.settings.api_key is not None:
        app.add_middleware(RequireKey, key=server.settings.api_key)
    if server.settings.allow_origins:  # added last, so it runs first: a preflight needs no key
        app.add_middleware(CORSMiddleware, allow_origins=list(server.settings.allow_origins),
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(ServeError(400, str(error), code="invalid_request"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods answer in OpenAI's error shape too."""
        message = {404: f"no route {request.method} {request.url.path}; routes: POST /v1/chat/completions, "
                        "POST /v1/completions, GET /v1/models, GET /health, GET /metrics",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, str(error.detail))
        return error_response(ServeError(error.status_code, message, code="not_found" if error.status_code == 404
                                         else "method_not_allowed" if error.status_code == 405 else None))

    @app.exception_handler(Exception)
    async def failed(request: Request, error: Exception) -> JSONResponse:
        return error_response(ServeError.internal(f"{request.method} {request.url.path}", error))

    served = None if server.settings.proxy and server.settings.upstream_model is None else server.model_name

    @app.post("/v1/chat/completions", openapi_extra=body_schema(ChatRequest, served))
    async def chat_completions(http: Request) -> Any:
        return await server.complete(http, ChatRequest, "chat")

    @app.post("/v1/completions", openapi_extra=body_schema(CompletionRequest, served))
    async def completions(http: Request) -> Any:
        return await server.complete(http, CompletionRequest, "completion")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": protocol.now(),
                                            "owned_by": "draftkv"}]}

    @app.get("/health")
    async def health(http: Request) -> JSONResponse:
        """200 while the worker serves; 503 when it had stopped (it is restarted by this check). Load
        balancers probe without a key and learn only that; the model and the queue are told to the key."""
        serving = server.scheduler.ensure_worker()
        body: dict[str, Any] = {"status": "ok" if serving else "restarting"}
        if server.settings.api_key is not None and has_key(http.headers.get("authorization", "").encode(),
                                                           server.settings.api_key.encode()):
            body.update({"mode": "proxy" if server.settings.proxy else "local", "model": server.model_name,
                         "waiting": server.scheduler.waiting, "running": server.scheduler.running,
                         "restarts": server.scheduler.restarts})
        return JSONResponse(body, status_code=200 if serving else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
