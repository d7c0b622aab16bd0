"""The model side of the server: one worker thread runs the models, requests wait in a bounded queue.

Requests that can share a batch (the same method with the same parameters) run together, as many as
`max_batch_size` and as fit the memory limit. Each request is checked before it runs: its prompt
length and the guess its method asks for against the limits, and its estimated memory against what is
left, so a request that cannot fit is refused with a reason instead of crashing the process. A request
whose client went away, or whose time ran out, stops at its next token.

A failure belongs to the request that caused it: a batch that fails is run again one request at a time
(text already streamed is not sent twice), so only the failing request gets the error, and the worker
thread catches everything, so one request can never stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..compress import compress_prompts
from ..engine.speculation import AUTO_MOST
from ..errors import DraftKVError, PromptError
from ..flow import Consumer, LayerKinds, Observer, StageEvent, check_fits, check_probes, run
from ..likelihood import Scored, score_continuations
from ..methods import Method, names
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
    request_id: str = "-"  # in its response, its log line and the server's log of its failure
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    prompt_tokens: int = 0  # counted by the handler, before the job is queued (0: the worker counts them)
    admitted: bool = False
    memory: int = 0  # estimated bytes while it runs
    prompt_logprobs: int | None = None  # echo with logprobs: score the prompt's own tokens (this many likeliest)
    prompt_scores: tuple[list[int], Scored] | None = None  # the prompt's ids and their scores, set before "done"
    sent: str = ""  # text handed to the client so far, over every try of this request
    produced: str = ""  # text this try has produced

    def emit(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the server's loop has closed: nobody waits for this
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))

    def retry(self) -> None:
        """Run again from the start: what the new try produces is sent only past what was sent."""
        self.produced = ""

    def send_text(self, text: str) -> None:
        """New text of this try; a retry sends only what goes past the text sent before."""
        self.produced += text
        if len(self.produced) <= len(self.sent):
            return
        if not self.produced.startswith(self.sent):
            raise ServeError(500, f"request {self.request_id} was run again after a failure beside it, and the "
                             "new run's text differs from what was already streamed; retry the request",
                             code="internal")
        self.emit("text", self.produced[len(self.sent):])
        self.sent = self.produced

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


def estimate_bytes(pair: ModelPair, method: Method, prompt_tokens: int, new_tokens: int,
                   speculate: int | str = 0) -> int:
    """What a request adds to memory while it runs, from the executor's plan for it: the draft's pass
    (when the plan asks for one), the target's cache and activations for what station 1 leaves, and the
    draft's cache for speculation (`auto` counted at its most proposals)."""
    speculator = LayerKinds.of(pair.draft.model.config) \
        if pair.draft is not None and pair.tokenizer_mismatch is None else None
    consumer = Consumer.of(method, [prompt_tokens], [new_tokens], LayerKinds.of(pair.target.model.config),
                           speculate=AUTO_MOST if speculate == "auto" else speculate, draft=speculator,
                           draft_cache=pair.draft_cache)
    total = 0
    target_tokens = consumer.rows[0].stage_length
    if consumer.need.needed and pair.draft is not None:
        draft = pair.draft.model
        draft_tokens = prompt_tokens + consumer.need.lookahead[0]
        total += draft_tokens * entry_bytes(draft) + activation_bytes(draft, prompt_tokens)
    if pair.target.model is not (pair.draft.model if pair.draft else None):  # proxy mode runs no target
        target = pair.target.model
        total += (target_tokens + new_tokens + consumer.speculation) * entry_bytes(target) \
            + activation_bytes(target, target_tokens)
    if consumer.speculation:  # the draft's cache for it: what it keeps of the prompt, and the answer
        draft = pair.draft.model
        kept = consumer.rows[0].draft_budget if pair.draft_cache != "whole" else None
        total += ((kept or prompt_tokens) + new_tokens + consumer.speculation) * entry_bytes(draft)
        if not consumer.need.needed:  # the draft reads the prompt for it alone
            total += activation_bytes(draft, prompt_tokens)
    return total


def free_memory(device: torch.device) -> int:
    """Memory free for requests now: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


@dataclass
class Limits:
    """What one request may ask for, besides what the models allow."""

    max_prompt_tokens: int | None = None  # the longest prompt (None: the model's context)
    max_new_tokens: int | None = None  # the most new tokens (None: what the context leaves)
    max_guess_tokens: int = 512  # the longest guess: the draft's lookahead or the target's pseudo-answer
    max_probes: int = 64  # the most probes a method may read the prompt back in (KVzip's chunks)


Hook = Callable[[StageEvent, list[Job]], None]


class Stopped(Exception):
    """Every request of the running batch was given up (its client left, or its time ran out)."""


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a forward pass runs one after another (the model itself when it names none)."""
    try:
        layers = model.get_decoder().layers
    except AttributeError:
        return [model]
    return list(layers) if len(layers) else [model]


@dataclass
class Watch:
    """The worker's view of a batch as the flow runs it: the hook hears each stage with the batch's
    jobs, and once every job is stopped, the next model layer to run before decoding raises Stopped, so
    a long stage (a long prefill, KVzip's reconstruction, a lookahead) frees the worker within one
    layer's time. Decoding stops row by row at its next token instead, with the text sent so far."""

    jobs: list[Job]
    hook: Hook | None = None
    decoding: bool = False  # from the decode's start on (speculation's own stages included)

    def observe(self, event: StageEvent) -> None:
        self.decoding = self.decoding or (event.event == "start" and event.stage == "decode")
        if self.hook is not None:
            self.hook(event, self.jobs)

    def check(self, _module: torch.nn.Module, _args: Any) -> None:
        if not self.decoding and all(job.stopped for job in self.jobs):
            raise Stopped

    @contextlib.contextmanager
    def layers_of(self, pair: ModelPair) -> Iterator[None]:
        """The stop check on every layer of the pair's models while the batch runs."""
        models = {id(m): m for m in (pair.target.model, pair.draft.model if pair.draft else None) if m is not None}
        handles = [layer.register_forward_pre_hook(self.check)
                   for model in models.values() for layer in decoder_layers(model)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


class Scheduler:
    """A bounded queue in front of one worker thread that runs batches of compatible requests.

    `run(pair, batch, hook)` answers every job of a batch. `hook`, when set, hears every stage a batch
    goes through with the batch's jobs: "admit" (one job's checks), the flow's stages, and "stream"
    before each piece of streamed text (tests inject failures there)."""

    def __init__(self, pair: ModelPair, run: Callable[[ModelPair, list[Job], Hook | None], None], *,
                 max_batch_size: int, max_queue: int, limits: Limits, memory_limit: int | None):
        self.pair, self.run = pair, run
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        self.limits = limits
        model = pair.target.model
        limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.context_limit = limit
        self.max_prompt_tokens = min(filter(None, [limits.max_prompt_tokens, limit]), default=None)
        # The handlers' own tokenizer (a fast tokenizer is not to be used from two threads at once) and the
        # most characters one token covers, which bounds a prompt's tokens from its characters.
        self.tokenizer, self.tokenizing = copy.deepcopy(pair.tokenizer), threading.Lock()
        self.longest_token = max(map(len, pair.tokenizer.get_vocab()), default=1)
        # A fixed budget for the memory of running requests: the given limit, or 90% of what is free
        # once the models are loaded.
        self.memory_limit = memory_limit if memory_limit is not None else int(0.9 * free_memory(model.device))
        self.hook: Hook | None = None
        self.queue: deque[Job] = deque()
        self.running = 0
        self.restarts = 0
        self.on_batch: Callable[[int], None] = lambda size: None  # the metrics count batch sizes
        self.condition = threading.Condition()
        self.closed = False
        self.thread = self.start_worker()

    def start_worker(self) -> threading.Thread:
        thread = threading.Thread(target=self.work, name="draftkv-worker", daemon=True)
        thread.start()
        return thread

    @property
    def serving(self) -> bool:
        return not self.closed and self.thread.is_alive()

    def ensure_worker(self) -> bool:
        """Restart the worker if it has stopped (it catches everything, so only a fault of the process
        itself stops it); True when it was running."""
        with self.condition:
            if self.closed or self.thread.is_alive():
                return True
            self.restarts += 1
            log.error("the worker thread had stopped; restarting it (restart %d)", self.restarts)
            self.thread = self.start_worker()
            return False

    def submit(self, job: Job) -> None:
        self.ensure_worker()
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
        """Check a request's length, the guess it asks for and its memory before it runs; raises
        ServeError when it cannot run."""
        if self.hook is not None:
            self.hook(StageEvent("admit", "start"), [job])
        n = job.prompt_tokens = job.prompt_tokens or self.count_tokens(job.request)
        asked = job.request.max_new_tokens
        if self.context_limit is not None and n + asked > self.context_limit:
            raise ServeError(400, f"the prompt has {n} tokens and max_tokens asks for {asked} more, past the model's "
                             f"context of {self.context_limit} tokens; shorten the prompt or lower max_tokens",
                             param="max_tokens", code="context_length_exceeded")
        try:
            guess = job.method.guess(asked)  # asked of the method, whether or not this prompt needs it
            self.check_guess(job.method, n, job.method.draft_lookahead(asked), guess.tokens if guess else 0)
            self.check_probes(job.method, n)
            speculate = job.request.speculate if job.request.speculate is not None else self.pair.speculate
            job.memory = estimate_bytes(self.pair, job.method, n, asked, speculate)
        except DraftKVError as error:  # a budget or a guess that does not fit this prompt
            raise ServeError(400, str(error), param="budget", code="invalid_parameter") from None
        if job.memory > self.memory_limit:
            raise ServeError(503, f"this request needs about {job.memory / 2**20:.0f} MiB ({n} prompt tokens, "
                             f"{asked} new, method {job.method.name}), more than the {self.memory_limit / 2**20:.0f} "
                             "MiB this server may use; use a prompt method with a smaller budget or a shorter "
                             "prompt", code="insufficient_memory")

    def count_tokens(self, request: Request) -> int:
        """The prompt's length in tokens, checked against the limit; safe to call from any thread (the
        request handlers count beside the worker, on a tokenizer of their own). A prompt whose characters
        alone are more than the limit's tokens can hold is refused before the tokenizer reads it."""
        limit = self.max_prompt_tokens
        if request.prompt_ids is not None:
            n = len(request.prompt_ids)
        else:
            texts = [request.context or "", request.question or "", request.system or "", request.answer_prefix or "",
                     *(str(message.get("content") or "") for message in request.messages or [])]
            characters = sum(len(text) for text in texts)
            if limit is not None and characters > limit * self.longest_token:
                raise ServeError(400, f"the prompt has {characters:,} characters, more than this server's limit of "
                                 f"{limit} tokens can hold (no token of this model is longer than "
                                 f"{self.longest_token} characters); shorten it", param="messages",
                                 code="context_length_exceeded")
            try:
                with self.tokenizing:
                    n = len(encode_prompt(self.tokenizer, request).ids)
            except DraftKVError as error:
                raise ServeError(400, str(error), code="invalid_prompt") from None
        if limit is not None and n > limit:
            raise ServeError(400, f"the prompt has {n} tokens, more than this server's limit of {limit}; shorten it",
                             param="messages", code="context_length_exceeded")
        return n

    def check_guess(self, method: Method, prompt_tokens: int, lookahead: int, pseudo_answer: int) -> None:
        """The guess a method asks for (the draft's lookahead, the target's pseudo-answer) buys compute:
        it is bounded by this server's limit and by the context of the model that writes it."""
        longest = max(lookahead, pseudo_answer)
        if longest > self.limits.max_guess_tokens:
            raise ServeError(400, f"method {method.name} asks for a guess of {longest} tokens (its lookahead or "
                             f"pseudo_tokens), more than this server's limit of {self.limits.max_guess_tokens} "
                             "(--max-guess-tokens); ask for fewer", param="method", code="invalid_parameter")
        if lookahead and self.pair.draft is not None:
            check_fits(self.pair.draft.model.config, "draft", prompt_tokens, lookahead)
        if pseudo_answer:
            check_fits(self.pair.target.model.config, "target", prompt_tokens, pseudo_answer)

    def check_probes(self, method: Method, prompt_tokens: int) -> None:
        """The probes a method reads the prompt back in (KVzip's reconstruction) buy compute too: their
        number, and the tokens each adds, are bounded by this server's limits, and each fits the context."""
        probes = method.reading_probes(prompt_tokens, self.pair.tokenizer)
        if len(probes) > self.limits.max_probes:
            raise ServeError(400, f"method {method.name} would read this {prompt_tokens}-token prompt back in "
                             f"{len(probes)} probes (its chunk), more than this server's limit of "
                             f"{self.limits.max_probes} (--max-probes); give a larger chunk", param="chunk",
                             code="invalid_parameter")
        added = max((tokens for tokens, _ in probes), default=0)
        if added > self.limits.max_guess_tokens:
            raise ServeError(400, f"method {method.name} asks each probe with {added} tokens (its instruction or "
                             f"hint), more than this server's limit of {self.limits.max_guess_tokens} "
                             "(--max-guess-tokens); give a shorter one", param="instruction", code="invalid_parameter")
        try:
            check_probes(method, self.pair.target.model.config, prompt_tokens, self.pair.tokenizer)
        except PromptError as error:
            longest = max(probes, key=sum)
            raise ServeError(400, str(error), param="instruction" if longest[0] > longest[1] else "chunk",
                             code="context_length_exceeded") from None

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
                if not job.admitted:
                    try:
                        self.admit(job)
                    except ServeError as error:
                        job.emit("error", error)
                        continue
                    except Exception as error:  # a fault while admitting fails this request alone
                        job.emit("error", ServeError.internal(job.request_id, error))
                        continue
                    job.admitted = True
                    job.emit("admitted", job.prompt_tokens)
                if batch and memory + job.memory > self.memory_limit:
                    self.queue.appendleft(job)  # admitted; runs in a later batch
                    break
                batch.append(job)
                memory += job.memory
            self.running = len(batch)
        return batch

    def work(self) -> None:
        """The worker thread: batch after batch until the server closes. `run` answers each job; whatever
        escapes it fails the batch's jobs that have no answer, and the worker goes on."""
        while not self.closed:
            batch: list[Job] = []
            try:
                batch = self.next_batch()
                if batch:
                    self.on_batch(len(batch))
                    self.run(self.pair, batch, self.hook)
            except BaseException as error:  # the worker must outlive any request
                for job in batch:
                    job.emit("error", ServeError.internal(job.request_id, error))
            finally:
                self.running = 0


def run_batch(work: Callable[[list[Job]], list[Any]], batch: list[Job]) -> None:
    """Run `work` on a batch and hand each job its result, or an error that fits what went wrong.

    A batch that fails is run again one request at a time, so only the request that fails alone gets
    an error; the others get the answers they would have had alone."""
    try:
        results = work(batch)
    except Stopped:  # nobody waits for these answers: no retry
        for job in batch:
            job.emit("error", ServeError(504, "the request was stopped: its time ran out or its client left",
                                         code="timeout"))
        return
    except Exception as error:  # each failure is answered below; the worker goes on
        if len(batch) > 1:
            for job in batch:
                job.retry()
                run_batch(work, [job])
            return
        job = batch[0]
        if isinstance(error, ServeError):
            job.emit("error", error)
        elif isinstance(error, DraftKVError):
            job.emit("error", ServeError(400, str(error), code="invalid_request"))
        elif isinstance(error, torch.OutOfMemoryError | MemoryError):
            job.emit("error", ServeError(503, f"out of memory while running this request ({error}); retry with a "
                                         "smaller budget or a shorter prompt", code="insufficient_memory"))
        else:
            job.emit("error", ServeError.internal(job.request_id, error))
        return
    for job, result in zip(batch, results, strict=True):
        job.emit("done", result)


def streamer(jobs: list[Job], observer: Observer | None) -> Callable[[int, str], None]:
    """The flow's text callback: each row's new text to its job (the observer hears "stream" first)."""
    def on_text(row: int, text: str) -> None:
        if observer is not None:
            observer(StageEvent("stream", "start"))
        jobs[row].send_text(text)

    return on_text


def run_local(pair: ModelPair, batch: list[Job], hook: Hook | None = None) -> None:
    """Local mode: the target answers the batch, streaming each row's text to its job. A job that echoes
    its prompt with logprobs gets the prompt's own token scores: the dense model's, one more pass over it."""
    def work(jobs: list[Job]) -> list[Any]:
        watch = Watch(jobs, hook)
        with watch.layers_of(pair):
            results = run(pair, [job.request for job in jobs], [jobs[0].method], observer=watch.observe,
                          on_text=streamer(jobs, watch.observe), cancelled=lambda row: jobs[row].stopped)[0]
        for job in jobs:
            if job.prompt_logprobs is not None:
                ids = encode_prompt(pair.tokenizer, job.request).ids
                scored = (score_continuations(pair, ids[:1], [ids[1:]], "dense", top=job.prompt_logprobs)[0][0]
                          if len(ids) > 1 else Scored([], [], []))
                job.prompt_scores = (ids, scored)
        return results

    run_batch(work, batch)


def run_proxy(pair: ModelPair, batch: list[Job], hook: Hook | None = None) -> None:
    """Proxy mode: the draft compresses the batch's prompts; the handlers forward them upstream."""
    def work(jobs: list[Job]) -> list[Any]:
        watch = Watch(jobs, hook)
        with watch.layers_of(pair):
            return compress_prompts(pair, [job.request for job in jobs], jobs[0].method, observer=watch.observe)

    run_batch(work, batch)


def check_proxy_method(method: Method) -> None:
    if method.compresses_kv:
        raise ServeError(400, f"method {method.name!r} compresses the target's KV cache, which runs upstream in proxy "
                         f"mode; use a prompt method ({', '.join(names('prompt only'))}) "
                         "or dense",
                         param="method", code="invalid_parameter")
