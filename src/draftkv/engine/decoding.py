"""Our own decode loop: explicit logical positions over a (possibly compressed) cache.

Greedy or sampled (temperature, top-k, top-p, a seed per request), stops on EOS and on stop
strings, and streams text deltas through a callback. Each row has its own generator, so a
batch samples exactly what its requests would sample one by one.

The loop calls one step function per new token: `EagerStep` (any device) is one model call over the
cache, with room for every new entry reserved once and the mask preallocated and read as a view. A
backend can bring another step (the same call signature) and must give the same tokens. Text is
detokenised incrementally: each step decodes only the last few tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache

from ..options import check_backend
from ..types import FinishReason, Sampling, TokenLogprob
from .attention import DECODE_ATTENTION, few_queries, follow_ragged
from .cache import reserve, select_rows
from .static import StaticStep, supports_static

TextCallback = Callable[[int, str], None]  # (row in the batch, new text)


@dataclass
class Decoded:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None  # per token, for a row that asked


@dataclass
class Accepted:
    """A row's first tokens, chosen before its decode by a check of a guessed answer: every token's
    entries but the last's are in the cache already, so the decode feeds the last one first."""

    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None  # per token, for a row that asked
    generator: torch.Generator | None = None  # the row's sampler, which chose them: the decode goes on with it
    rounds: int = 0  # times the guess was corrected and guessed again before these tokens were kept


@dataclass
class DecodeOutput:
    rows: list[Decoded]
    first_token_at: float  # time.perf_counter() when the first tokens were picked
    steps: int  # forward passes run


def sampling_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The distribution a sampled row draws its next token from [V]: logits [V] after temperature,
    top-k and top-p."""
    scores = logits.float() / sampling.temperature
    if sampling.top_k:
        kth_best = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if sampling.top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the best one always stays).
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= sampling.top_p
        scores = scores.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return torch.softmax(scores, dim=-1)


def pick_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]) -> list[int]:
    """Next token per row from logits [B, V]."""
    if all(s.greedy for s in samplings):
        return logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (sampling, generator) in enumerate(zip(samplings, generators, strict=True)):
        if sampling.greedy:
            tokens.append(int(logits[row].argmax()))
            continue
        tokens.append(int(torch.multinomial(sampling_probs(logits[row], sampling), 1, generator=generator)))
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]) -> list[TokenLogprob | None]:
    """Each asking row's picked token with its log-probability under the model (before any temperature)
    and its `wanted[row]` likeliest tokens."""
    scored: list[TokenLogprob | None] = [None] * len(tokens)
    rows = [row for row, top in enumerate(wanted) if top is not None]
    log_probs = torch.log_softmax(logits[rows].float(), dim=-1)
    for index, row in enumerate(rows):
        top = torch.topk(log_probs[index], wanted[row]) if wanted[row] else None
        scored[row] = TokenLogprob(tokens[row], float(log_probs[index, tokens[row]]),
                                   list(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top else [])
    return scored


def make_generators(samplings: list[Sampling], device: torch.device) -> list[torch.Generator | None]:
    generators: list[torch.Generator | None] = []
    for sampling in samplings:
        if sampling.greedy or sampling.seed is None:
            generators.append(None)
        else:
            generator = torch.Generator(device=device)
            generator.manual_seed(sampling.seed)
            generators.append(generator)
    return generators


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not safe to stream yet: a partial character or stop string."""
    if text.endswith("\ufffd"):
        return 1
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


class IncrementalText:
    """One row's text, detokenised a few tokens at a time: the text of the tokens since `prefix` with
    and without the newest ones, whose difference is what they add. Decoding from a few tokens back
    keeps what a token means in context (a leading space, a character split over several tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0  # ids[prefix:read] were decoded as context; ids[read:] are pending

    def _decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: it rewrites text already shown ("a ." -> "a.") and corrupts code.
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """The whole text after `token`; an unfinished character at the end waits for the next token."""
        self.ids.append(token)
        self.text += self._pending(final=False)
        return self.text

    def finish(self) -> str:
        """The whole text, with whatever was still pending (an unfinished character included)."""
        self.text += self._pending(final=True)
        return self.text

    def _pending(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix: self.read])
        after = self._decode(self.ids[self.prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class DecodeStep(Protocol):
    """One decoding step: logits [B, V] after `tokens` [B, 1] at `positions` [B, 1]."""

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...

    def select(self, rows: list[int], taken: int) -> DecodeStep:
        """The same step for the batch rows `rows` alone, after `taken` steps (finished rows dropped)."""


@dataclass
class DecodeSpec:
    """What a decode generates and how: per row its length, sampling, stop tokens and strings and
    log-probabilities; the text stream and cancellation; eviction; the step's backend."""

    max_new_tokens: list[int]
    samplings: list[Sampling]
    eos_token_ids: list[set[int]]
    tokenizer: Any = None  # without one, text is left empty (the draft's lookahead only needs ids)
    stops: list[tuple[str, ...]] | None = None
    logprobs: list[int | None] | None = None  # per row: report this many likeliest tokens (None: not)
    on_text: TextCallback | None = None
    cancelled: Callable[[int], bool] | None = None  # a row for which it turns true stops at its next token
    after_step: Callable[[DynamicCache], None] | None = None  # sees the cache after every forward pass (eviction)
    backend: str = "eager"
    compact: bool = True  # once half the rows are finished, go on with the others alone
    consume: bool = False  # the cache is not needed afterwards (the static step may let go of it as it copies)
    step: DecodeStep | None = field(default=None, repr=False)  # the step itself (default: the backend's)
    accepted: list[Accepted | None] | None = None  # per row, the tokens it starts with (positions follow them)

    @classmethod
    def greedy(cls, max_new_tokens: list[int], eos: set[int], backend: str = "eager", **given: Any) -> DecodeSpec:
        """Greedy tokens with one stop set for every row (a guess of the answer)."""
        return cls(max_new_tokens, [Sampling()] * len(max_new_tokens), [eos] * len(max_new_tokens), backend=backend,
                   **given)


class EagerStep:
    """One decoding step on any device: the model reads one token per row over `cache`.

    Room for `steps` new entries is reserved in the cache once (they are written in place), and the
    attention mask ([B, physical length], None when no row has padding) is preallocated for every step
    and read as a view."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache | None, attention_mask: torch.Tensor | None,
                 steps: int) -> None:
        self.model, self.cache, self.steps = model, cache, steps
        if cache is not None:
            reserve(cache, steps)
        self.mask, self.length = None, 0
        if attention_mask is not None:
            self.length = attention_mask.shape[1]
            self.mask = attention_mask.new_ones(attention_mask.shape[0], self.length + steps)
            self.mask[:, : self.length] = attention_mask

    def select(self, rows: list[int], taken: int) -> EagerStep:
        """The same step for the batch rows `rows` alone, after `taken` steps (finished rows dropped)."""
        index = torch.tensor(rows, device=self.model.device)
        chosen = EagerStep.__new__(EagerStep)
        chosen.model, chosen.steps, chosen.length = self.model, self.steps, self.length  # steps: of the whole decode
        # Padding no running row uses is dropped, unless a batch-wide mask of the old width still applies.
        chosen.cache = select_rows(self.cache, index, self.steps - taken, trim=self.mask is None) \
            if self.cache is not None else None
        chosen.mask = self.mask[index] if self.mask is not None else None
        if self.cache is not None:
            follow_ragged(self.cache, chosen.cache)
        return chosen

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after `tokens` [B, 1] at `positions` [B, 1]."""
        self.length += 1
        mask = self.mask[:, : self.length] if self.mask is not None else None
        with torch.inference_mode(), sdpa_kernel(DECODE_ATTENTION):
            out = self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, cache=self.cache,
                             use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]


def make_step(backend: str, model: torch.nn.Module, cache: DynamicCache | None, attention_mask: torch.Tensor | None,
              steps: int, evicting: bool = False, consume: bool = False) -> DecodeStep:
    """The decode step of a backend: "eager", "static" (fixed shapes, a CUDA graph on CUDA: see
    draftkv.engine.static), or "auto" (static on CUDA, eager elsewhere). A decode the static step cannot
    take (a sliding window, decode-time eviction, flex attention) takes the eager step. `consume`: the
    static step may let go of `cache` while copying it (the caller needs it no more)."""
    if steps > 0 and not evicting and takes_static(backend, model, cache):
        return StaticStep(model, cache, attention_mask, steps, consume=consume)
    return EagerStep(model, cache, attention_mask, steps)


def takes_static(backend: str, model: torch.nn.Module, cache: DynamicCache | None) -> bool:
    """Whether a decode over `cache` takes the static step (which leaves the cache as it was)."""
    if check_backend(backend) == "auto":
        backend = "static" if model.device.type == "cuda" else "eager"
    return backend == "static" and supports_static(model, cache) is None


def first_stop(text: str, searched: int, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string starts in `text`, looking only where a new one can be: from
    `searched` (the length already searched) less the longest stop's length."""
    hits = [hit for stop in stops if (hit := text.find(stop, max(searched - len(stop) + 1, 0))) >= 0]
    return min(hits) if hits else None


class RowOutput:
    """One row's tokens and text as they come: its stop rules, and what it has streamed."""

    def __init__(self, tokenizer, max_new_tokens: int, eos: set[int], stops: tuple[str, ...],
                 logprobs: bool = False) -> None:
        self.max_new_tokens, self.eos, self.stops = max_new_tokens, eos, stops
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = [] if logprobs else None
        self.text = IncrementalText(tokenizer) if tokenizer is not None else None
        self.shown = ""  # the text so far, cut at a stop string
        self.streamed = 0
        self.finish: FinishReason | None = "length" if max_new_tokens == 0 else None

    def take(self, token: int, logprob: TokenLogprob | None = None) -> None:
        """The row's next token: kept, or the end of the row (EOS, a stop string, its length)."""
        if token in self.eos:
            self.end("stop")
            return
        self.token_ids.append(token)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
        if self.text is not None:
            searched = len(self.shown)
            self.shown = self.text.add(token)
            if (at := first_stop(self.shown, searched, self.stops)) is not None:
                self.shown, self.finish = self.shown[:at], "stop"
                return
        if len(self.token_ids) >= self.max_new_tokens:
            self.end("length")

    def end(self, reason: FinishReason) -> None:
        """Finish the row: its text gets what was still pending (an unfinished character), unless a
        stop string in it ends the text earlier."""
        self.finish = reason
        if self.text is not None:
            full = self.text.finish()
            at = first_stop(full, len(self.shown), self.stops)
            self.shown = full[:at] if at is not None else full

    def new_text(self) -> str:
        """Text not streamed yet and settled: a partial character or the start of a stop string waits."""
        safe = len(self.shown) if self.finish else len(self.shown) - _held_back(self.shown, self.stops)
        piece = self.shown[self.streamed: safe] if safe > self.streamed else ""
        self.streamed = max(self.streamed, safe)
        return piece


def decode(model: torch.nn.Module, cache: DynamicCache, first_logits: torch.Tensor, positions: torch.Tensor,
           attention_mask: torch.Tensor | None, spec: DecodeSpec) -> DecodeOutput:
    """Generate from `first_logits` [B, V] (the prefill's last position) and a filled `cache`, as `spec` says.

    positions: [B] logical position of the next token per row. attention_mask: [B, physical cache
    length] (None when no row has padding). A cancelled row ends with finish reason "cancelled" (a
    server's client went away or ran out of time).

    On a CPU each step's grouped query heads read their KV head as one stacked query block
    (`few_queries`): SDPA's grouped path for one query is many times slower there, in bfloat16 above all
    (results/cpu-bfloat16/decode_attention.json).
    """
    with few_queries(model) if first_logits.device.type == "cpu" else nullcontext():
        return _decode(model, cache, first_logits, positions, attention_mask, spec)


def _decode(model: torch.nn.Module, cache: DynamicCache, first_logits: torch.Tensor, positions: torch.Tensor,
            attention_mask: torch.Tensor | None, spec: DecodeSpec) -> DecodeOutput:
    batch = first_logits.shape[0]
    max_new_tokens, samplings, cancelled, after_step = spec.max_new_tokens, spec.samplings, spec.cancelled, spec.after_step
    wanted = spec.logprobs if spec.logprobs is not None and any(k is not None for k in spec.logprobs) else None
    rows = [RowOutput(spec.tokenizer, limit, eos, row_stops, logprobs=wanted is not None and wanted[row] is not None)
            for row, (limit, eos, row_stops) in enumerate(zip(max_new_tokens, spec.eos_token_ids,
                                                              spec.stops or [()] * batch, strict=True))]
    generators = make_generators(samplings, first_logits.device)
    accepted = spec.accepted or [None] * batch
    for number, given in enumerate(accepted):
        if given is not None and given.generator is not None:
            generators[number] = given.generator
    logits = first_logits
    positions = positions.clone().view(batch, 1)
    step = spec.step or make_step(spec.backend, model, cache, attention_mask, max(max_new_tokens, default=0),
                                  evicting=after_step is not None, consume=spec.consume)
    first_token_at = 0.0
    steps = 0
    live = list(range(batch))  # the original row of each row the step still runs
    for index in range(max(max_new_tokens)):
        given = [accepted[number] if index == 0 else None for number in live]
        picking = [at for at, tokens in enumerate(given) if tokens is None]
        picked_logits = logits if len(picking) == len(live) else logits[picking]
        picked = pick_tokens(picked_logits, [samplings[live[at]] for at in picking],
                             [generators[live[at]] for at in picking]) if picking else []
        if index == 0:
            first_token_at = time.perf_counter()
        scored = token_logprobs(picked_logits, picked, [wanted[live[at]] for at in picking]) if wanted and picking \
            else [None] * len(picking)
        # Each row takes its picked token, or the tokens it was given (the last of which it is fed next).
        offered = {at: ([token], [logprob]) for at, token, logprob in zip(picking, picked, scored, strict=True)}
        next_tokens = []
        for at, number in enumerate(live):
            tokens, logprobs = offered[at] if given[at] is None else (given[at].token_ids, given[at].logprobs)
            next_tokens.append(tokens[-1])
            row, took = rows[number], False
            for token, logprob in zip(tokens, logprobs or [None] * len(tokens), strict=True):
                if row.finish is not None:
                    break
                if cancelled is not None and cancelled(number):
                    row.end("cancelled")
                    break
                row.take(token, logprob)
                took = True
            if took and spec.on_text is not None and (piece := row.new_text()):
                spec.on_text(number, piece)
        running = [at for at, number in enumerate(live) if rows[number].finish is None]
        if not running:
            break
        # Finished rows are fed a token too while they are few; once half the rows are done, the step
        # goes on with the running rows alone (decode-time eviction keeps its batch whole).
        if spec.compact and len(running) <= len(live) // 2 and after_step is None:
            step = step.select(running, steps)
            live = [live[at] for at in running]
            positions = positions[running]
            next_tokens = [next_tokens[at] for at in running]
        logits = step(torch.tensor(next_tokens, device=first_logits.device).view(len(live), 1), positions)
        positions += 1
        steps += 1
        if after_step is not None:
            after_step(cache)
    decoded = [Decoded(row.token_ids, row.shown, row.finish or "length", row.logprobs) for row in rows]
    return DecodeOutput(rows=decoded, first_token_at=first_token_at, steps=steps)
