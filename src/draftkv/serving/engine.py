"""The model side of the server: one worker thread runs the models, requests wait in a bounded queue.

Requests that can share a batch (the same method with the same parameters) run together, as many as
`max_batch_size` and as fit the memory limit. Each request is checked before it runs: its prompt
length against the limits, and its estimated memory against what is left, so a request that cannot
fit is refused with a reason instead of crashing the process. A request whose client went away, or
whose time ran out, stops at its next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..compress import compress_prompts
from ..errors import DraftKVError
from ..flow.plan import Consumer
from ..likelihood import Scored, score_continuations
from ..methods import Method
from ..pipeline import generate_batch
from ..prompt import encode_prompt
from ..types import Request
from .protocol import ServeError

if TYPE_CHECKING:
    from ..models import ModelPair

log = logging.getLogger("draftkv.serve")


@dataclass(eq=False)
class Job:
    """One request on its way through the worker. Events go back to the HTTP handler's event loop:
    ("admitted", prompt tokens), ("text", new text), ("done", result) or ("error", ServeError)."""

    request: Request
    method: Method
    loop: asyncio.AbstractEventLoop
    deadline: float  # time.monotonic() after which the request is given up
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    prompt_tokens: int = 0
    memory: int = 0  # estimated bytes while it runs
    prompt_logprobs: int | None = None  # echo with logprobs: score the prompt's own tokens (this many likeliest)
    prompt_scores: tuple[list[int], Scored] | None = None  # the prompt's ids and their scores, set before "done"

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    @property
    def stopped(self) -> bool:
        return self.cancelled or time.monotonic() > self.deadline


def entry_bytes(model: torch.nn.Module) -> int:
    """Bytes of one KV entry (one token, every layer, keys and values)."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def activation_bytes(model: torch.nn.Module, tokens: int) -> int:
    """Working memory of a prefill of `tokens` tokens beside its cache: one layer's activations."""
    config = model.config.get_text_config()
    width = 4 * config.hidden_size + 3 * config.intermediate_size
    return tokens * width * next(model.parameters()).element_size()


def estimate_bytes(pair: ModelPair, method: Method, prompt_tokens: int, new_tokens: int) -> int:
    """What a request adds to memory while it runs, from the executor's plan for it: the draft's pass
    (when the plan asks for one) and the target's cache and activations for what station 1 leaves."""
    consumer = Consumer.of(method, [prompt_tokens], [new_tokens])
    total = 0
    target_tokens = consumer.budgets.prompt[0] if consumer.budgets.compress_prompt[0] else prompt_tokens
    if consumer.need.needed and pair.draft is not None:
        draft = pair.draft.model
        draft_tokens = prompt_tokens + consumer.need.lookahead[0]
        total += draft_tokens * entry_bytes(draft) + activation_bytes(draft, prompt_tokens)
    if pair.target.model is not (pair.draft.model if pair.draft else None):  # proxy mode runs no target
        target = pair.target.model
        total += (target_tokens + new_tokens) * entry_bytes(target) + activation_bytes(target, target_tokens)
    return total


def free_memory(device: torch.device) -> int:
    """Memory free for requests now: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


class Scheduler:
    """A bounded queue in front of one worker thread that runs batches of compatible requests."""

    def __init__(self, pair: ModelPair, run: Callable[[ModelPair, list[Job]], None], *, max_batch_size: int,
                 max_queue: int, max_prompt_tokens: int | None, memory_limit: int | None):
        self.pair, self.run = pair, run
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        model = pair.target.model
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.context_limit = limit
        self.max_prompt_tokens = min(filter(None, [max_prompt_tokens, limit]), default=None)
        # A fixed budget for the memory of running requests: the given limit, or 90% of what is free
        # once the models are loaded.
        self.memory_limit = memory_limit if memory_limit is not None else int(0.9 * free_memory(model.device))
        self.queue: deque[Job] = deque()
        self.running = 0
        self.on_batch: Callable[[int], None] = lambda size: None  # the metrics count batch sizes
        self.condition = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self.loop, name="draftkv-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.condition:
            if len(self.queue) >= self.max_queue:
                raise ServeError(503, f"the server is busy: {len(self.queue)} requests are waiting (limit "
                                 f"{self.max_queue}); retry later", code="queue_full")
            self.queue.append(job)
            self.condition.notify()

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify_all()
        self.thread.join(timeout=5)

    @property
    def waiting(self) -> int:
        return len(self.queue)

    def admit(self, job: Job) -> None:
        """Check a request's length and memory before it runs; raises ServeError when it cannot."""
        try:
            n = len(encode_prompt(self.pair.tokenizer, job.request).ids)
        except DraftKVError as error:
            raise ServeError(400, str(error), code="invalid_prompt") from None
        job.prompt_tokens = n
        asked = job.request.max_new_tokens
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise ServeError(400, f"the prompt has {n} tokens, more than this server's limit of "
                             f"{self.max_prompt_tokens}; shorten it", param="messages", code="context_length_exceeded")
        if self.context_limit is not None and n + asked > self.context_limit:
            raise ServeError(400, f"the prompt has {n} tokens and max_tokens asks for {asked} more, past the model's "
                             f"context of {self.context_limit} tokens; shorten the prompt or lower max_tokens",
                             param="max_tokens", code="context_length_exceeded")
        try:
            job.memory = estimate_bytes(self.pair, job.method, n, asked)
        except DraftKVError as error:  # a budget that does not fit this prompt
            raise ServeError(400, str(error), param="budget", code="invalid_parameter") from None
        if job.memory > self.memory_limit:
            raise ServeError(503, f"this request needs about {job.memory / 2**20:.0f} MiB ({n} prompt tokens, "
                             f"{asked} new, method {job.method.name}), more than the {self.memory_limit / 2**20:.0f} "
                             "MiB this server may use; use a prompt method with a smaller budget or a shorter "
                             "prompt", code="insufficient_memory")

    def next_batch(self) -> list[Job]:
        """The first admitted request and the queued ones that can share its batch and fit beside it."""
        batch: list[Job] = []
        memory = 0
        with self.condition:
            while not self.closed and not self.queue:
                self.condition.wait()
            for job in list(self.queue):
                if len(batch) >= self.max_batch_size:
                    break
                if batch and job.method != batch[0].method:
                    continue
                self.queue.remove(job)
                if job.stopped:
                    continue  # its client left, or its time ran out, while it waited
                if not job.prompt_tokens:
                    try:
                        self.admit(job)
                    except ServeError as error:
                        job.emit("error", error)
                        continue
                    job.emit("admitted", job.prompt_tokens)
                if batch and memory + job.memory > self.memory_limit:
                    self.queue.appendleft(job)  # admitted; runs in a later batch
                    break
                batch.append(job)
                memory += job.memory
            self.running = len(batch)
        return batch

    def loop(self) -> None:
        while not self.closed:
            batch = self.next_batch()
            if not batch:
                continue
            self.on_batch(len(batch))
            try:
                self.run(self.pair, batch)
            finally:
                self.running = 0


def run_batch(work: Callable[[list[Job]], list[Any]], batch: list[Job]) -> None:
    """Run `work` on a batch and hand each job its result, or an error that fits what went wrong.

    A batch that fails on bad input is retried one request at a time, so only the bad one fails."""
    try:
        results = work(batch)
    except DraftKVError as error:
        if len(batch) > 1:
            for job in batch:
                run_batch(work, [job])
            return
        batch[0].emit("error", ServeError(400, str(error), code="invalid_request"))
        return
    except (torch.OutOfMemoryError, MemoryError) as error:
        for job in batch:
            job.emit("error", ServeError(503, f"out of memory while running this request ({error}); retry with a "
                                         "smaller budget or a shorter prompt", code="insufficient_memory"))
        return
    except Exception as error:  # a bug: answer 500 and keep serving
        log.exception("request failed")
        for job in batch:
            job.emit("error", ServeError(500, f"internal error: {type(error).__name__}: {error}", code="internal"))
        return
    for job, result in zip(batch, results, strict=True):
        job.emit("done", result)


def run_local(pair: ModelPair, batch: list[Job]) -> None:
    """Local mode: the target answers the batch, streaming each row's text to its job. A job that echoes
    its prompt with logprobs gets the prompt's own token scores: the dense model's, one more pass over it."""
    def work(jobs: list[Job]) -> list[Any]:
        results = generate_batch(pair, [job.request for job in jobs], jobs[0].method,
                                 on_text=lambda row, text: jobs[row].emit("text", text),
                                 cancelled=lambda row: jobs[row].stopped)
        for job in jobs:
            if job.prompt_logprobs is not None:
                ids = encode_prompt(pair.tokenizer, job.request).ids
                scored = (score_continuations(pair, ids[:1], [ids[1:]], "dense", top=job.prompt_logprobs)[0][0]
                          if len(ids) > 1 else Scored([], [], []))
                job.prompt_scores = (ids, scored)
        return results

    run_batch(work, batch)


def run_proxy(pair: ModelPair, batch: list[Job]) -> None:
    """Proxy mode: the draft compresses the batch's prompts; the handlers forward them upstream."""
    run_batch(lambda jobs: compress_prompts(pair, [job.request for job in jobs], jobs[0].method), batch)


def check_proxy_method(method: Method) -> None:
    if method.compresses_kv:
        raise ServeError(400, f"method {method.name!r} compresses the target's KV cache, which runs upstream in proxy "
                         "mode; use a prompt method (specpc, specprefill, lingua, keep-last, keep-ends) or dense",
                         param="method", code="invalid_parameter")
