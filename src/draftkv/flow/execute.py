"""The executor: the one request flow, for N consumers over one batch of requests.

    tokenize with the chat template                       (once)
    -> draft pass: prefill + lookahead                      (once, for every consumer that asks)
    -> [station 1] keep prompt tokens                       (per consumer that compresses the prompt)
    -> target prefill, capturing each consumer's scores     (once per distinct prompt the target reads)
       + probes: the draft's lookahead, a pseudo-answer     (once per guess)
    -> [station 2] keep KV entries                          (per consumer)
    -> decode and build the stats                           (per consumer: results.finish)

Sharing is exact: a shorter greedy lookahead is the first tokens of a longer one, and prompt queries
never see later tokens, so every consumer gets what its own run would give. `generate` is N = 1; the
eval runner, the agreement analysis, the benchmark and the server use the same flow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..engine.attention import WindowCollector
from ..engine.cache import (
    append_entries,
    bytes_per_entry,
    clone_cache,
    compressed_layers,
    kv_bytes,
    layer_entry_bytes,
)
from ..engine.decoding import Accepted, TextCallback
from ..errors import ConfigError, TokenizerMismatchError
from ..methods import KVScorer, Method, get_method, names
from ..models.dtypes import dtype_name
from ..prompt import EncodedPrompt, encode_prompts
from ..types import Request, Result
from .batch import DraftView, PaddedBatch, lookahead_view, pad_prompts, pad_token
from .plan import Consumer, LayerKinds, decodes_alone
from .results import Prepared, TargetSide, finish, finish_together
from .select import KeptPrompt, keep_prompt, kv_stage
from .steps import (
    Clock,
    GuessReading,
    Observer,
    check_fits,
    check_guesses,
    check_probes,
    eos_ids,
    guess_again,
    probe,
    pseudo_answer,
    run_draft,
    target_prefill,
)

if TYPE_CHECKING:
    from ..models import ModelPair


def run(pair: ModelPair, requests: list[Request], methods: list[str | Method], *, observer: Observer | None = None,
        on_text: TextCallback | None = None, cancelled: Callable[[int], bool] | None = None,
        decode_together: bool = False, prompts: list[EncodedPrompt] | None = None) -> list[list[Result]]:
    """Every method's results for the batch (per method, per request): exactly what each would give alone.

    `on_text(row, text)` streams each row's new text, and a row whose `cancelled(row)` turns true stops
    at its next token. `decode_together`: see run_each. `prompts`: the requests already encoded."""
    results: list[list[Result]] = [[] for _ in methods]
    for index, finished in run_each(pair, requests, methods, observer=observer, on_text=on_text, cancelled=cancelled,
                                    decode_together=decode_together, prompts=prompts):
        results[index] = finished
    return results


@torch.inference_mode()
def run_each(pair: ModelPair, requests: list[Request], methods: list[str | Method], *,
             observer: Observer | None = None, on_text: TextCallback | None = None,
             cancelled: Callable[[int], bool] | None = None, decode_together: bool = False,
             prompts: list[EncodedPrompt] | None = None) -> Iterator[tuple[int, list[Result]]]:
    """`run`, yielding (method index, its results) as each method finishes. Each is decoded before the
    next is compressed, so at most one copy of the full cache exists beside it.

    `decode_together`: every method's cache is kept until all are compressed, and they decode as one
    batch (results.finish_together): the weights are read once per step for all of them. No streaming."""
    if decode_together and (on_text is not None or cancelled is not None):
        raise ConfigError("methods decoded together cannot stream text or be cancelled one by one")
    chosen = [get_method(m) for m in methods]
    target = LayerKinds.of(pair.target.model.config)
    draft = LayerKinds.of(pair.draft.model.config) if pair.draft is not None else None
    alone = [i for i, m in enumerate(chosen) if decodes_alone(m, len(requests), target, draft)]
    together = [i for i in range(len(chosen)) if i not in alone]
    if together and decode_together:
        ready = dict(prepare_each(pair, requests, [chosen[i] for i in together], observer=observer, prompts=prompts))
        for index, finished in enumerate(finish_together(pair, [ready[i] for i in range(len(together))])):
            yield together[index], finished
    elif together:
        for index, prepared in prepare_each(pair, requests, [chosen[i] for i in together], observer=observer,
                                            prompts=prompts):
            yield together[index], finish(pair, prepared, on_text, cancelled)
    for i in alone:
        yield i, [run(pair, [request], [chosen[i]], observer=observer,
                      on_text=(lambda _r, text, row=row: on_text(row, text)) if on_text else None,
                      cancelled=(lambda _r, row=row: cancelled(row)) if cancelled else None,
                      prompts=[prompts[row]] if prompts is not None else None)[0][0]
                  for row, request in enumerate(requests)]


@torch.inference_mode()
def prepare(pair: ModelPair, requests: list[Request], methods: list[str | Method], *,
            prompts: list[EncodedPrompt] | None = None, observer: Observer | None = None,
            read: bool = True, beside: bool | None = None, answers: bool = True) -> list[Prepared]:
    """Every consumer's prepared batch, in the order of `methods` (see prepare_each)."""
    prepared: list[Prepared | None] = [None] * len(methods)
    for index, ready in prepare_each(pair, requests, methods, prompts=prompts, observer=observer, read=read,
                                     beside=beside, answers=answers):
        prepared[index] = ready
    return prepared


@torch.inference_mode()
def prepare_each(pair: ModelPair, requests: list[Request], methods: list[str | Method], *,
                 prompts: list[EncodedPrompt] | None = None, observer: Observer | None = None,
                 read: bool = True, beside: bool | None = None, answers: bool = True,
                 ) -> Iterator[tuple[int, Prepared]]:
    """The flow up to decoding. Yields (consumer index, its prepared batch) as each is ready; with
    `read=False` it stops after station 1 (no target work: prompt compression alone).
    `prompts`: the requests already encoded (query-agnostic mode encodes only the context).
    `beside`: run the draft beside the target's prefill when nothing before the probe needs it
    (default: on CUDA). `answers`: the caches will be decoded into the requests' answers (see Consumer.of);
    False for a cache read otherwise (a likelihood, a question asked later)."""
    target = pair.target.model
    device = target.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    clock = Clock(device, observer)
    started = clock.start("tokenize")
    if prompts is None:
        prompts = encode_prompts(pair.tokenizer, requests)
    lengths = [len(p.ids) for p in prompts]
    for request, n in zip(requests, lengths, strict=True):
        check_fits(target.config, "target", n, request.max_new_tokens)
    batch = pad_prompts([p.ids for p in prompts], pad_token(pair.tokenizer), device)
    clock.add("tokenize", clock.now() - started)
    kinds = LayerKinds.of(target.config)
    speculator = LayerKinds.of(pair.draft.model.config) \
        if pair.draft is not None and pair.tokenizer_mismatch is None else None
    speculate = speculation_asked([r.speculate if r.speculate is not None else pair.speculate for r in requests])
    costs = None
    if speculate == "auto" and speculator is not None and answers:
        if pair.call_costs is None:  # timed once per pair, by the first request that asks
            measuring = clock.start("speculation_costs")
            pair.speculation_costs()
            clock.add("speculation_costs", clock.now() - measuring)
        costs = pair.call_costs
    consumers = [Consumer.of(get_method(m), lengths, [r.max_new_tokens for r in requests], kinds, answers,
                             speculate, speculator, pair.draft_cache, costs) for m in methods]
    for consumer in consumers:  # the target's own guess (LAQ++'s pseudo-answer) and probes are read at the prompt's end
        for row in (row for row in consumer.rows if row.drops_entries):
            if consumer.guess is not None:
                check_fits(target.config, "target", row.prompt_length, consumer.guess.tokens)
            check_probes(consumer.method, target.config, row.stage_length, pair.tokenizer)

    draft_clock = Clock(device, observer)
    # When only KV methods use the draft, the target's prefill does not wait for it: on CUDA the draft
    # runs beside it, on its own stream (only the probe waits for the lookahead). On a CPU both would
    # share the cores, so the order stays sequential.
    beside = device.type == "cuda" if beside is None else beside
    drafted = Beside(lambda: draft_pass(pair, requests, prompts, batch, consumers, draft_clock), device,
                     beside and any(c.need.needed for c in consumers)
                     and all(c.reads_whole_prompt for c in consumers if c.need.needed))
    draft_prompts, views = drafted.result() if not drafted.running else (prompts, None)

    own_clocks = [Clock(device, observer) for _ in consumers]
    kept = [station_one(pair, requests, prompts, draft_prompts, batch, consumer, view, own)
            for consumer, view, own in zip(consumers, views or [None] * len(consumers), own_clocks, strict=True)]

    def prepared(index: int, shared: dict[str, float], target_side: TargetSide | None = None) -> Prepared:
        stages = {**clock.stages, **shared, **own_clocks[index].stages}
        return Prepared(consumers[index], requests, prompts, kept[index], drafted.result()[1][index],
                        Clock(device, observer, stages), started, target_side, dtype_name(target.dtype))

    if not read:
        for index in range(len(consumers)):
            yield index, prepared(index, draft_clock.stages if consumers[index].need.needed else {})
        return
    # The target reads each distinct prompt once: all consumers that keep the whole prompt share one prefill.
    groups = [[i for i, c in enumerate(consumers) if c.reads_whole_prompt]]
    groups += [[i] for i, c in enumerate(consumers) if not c.reads_whole_prompt]
    for group in filter(None, groups):
        group_clock = Clock(device, observer)
        uses_draft = any(consumers[i].need.needed for i in group)
        shared = draft_clock.stages if uses_draft else {}
        whole = prompts if consumers[group[0]].reads_whole_prompt else None  # else the batch holds kept tokens
        for index, target_side in read_target(pair, requests, [consumers[i] for i in group],
                                              lambda group=group: [drafted.result()[1][i] for i in group],
                                              kept[group[0]].batch, whole, group_clock,
                                              [own_clocks[i] for i in group]):
            yield group[index], prepared(group[index], {**shared, **group_clock.stages}, target_side)



def speculation_asked(asked: list[int | str]) -> int | str:
    """What a batch speculates with, from what each request asked: the most proposals a request fixed,
    else `auto` where one asked for it, else none."""
    fixed = [value for value in asked if value != "auto"]
    return max(fixed) if any(fixed) or "auto" not in asked else "auto"


class Beside:
    """`work()` run now, or (when `beside`) in a thread on its own CUDA stream while the caller goes on;
    `result()` waits for it, and orders the caller's stream after the work's."""

    def __init__(self, work: Callable, device: torch.device, beside: bool) -> None:
        self.running = beside
        if not beside:
            self._result = work()
            return
        stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._stream = stream
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))  # its inputs are ready

        def run():
            with torch.inference_mode(), torch.cuda.stream(stream) if stream is not None else nullcontext():
                return work()

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftkv-draft")
        self._future = pool.submit(run)
        pool.shutdown(wait=False)  # its one thread ends with the work
        self._device = device

    def result(self):
        if self.running:
            self._result = self._future.result()
            if self._stream is not None:
                torch.cuda.current_stream(self._device).wait_stream(self._stream)
            self.running = False
        return self._result


def station_one(pair: ModelPair, requests: list[Request], prompts: list[EncodedPrompt],
                draft_prompts: list[EncodedPrompt], batch: PaddedBatch, consumer: Consumer, view: DraftView | None,
                clock: Clock) -> KeptPrompt:
    """Station 1 for a consumer that drops prompt tokens; the others read the prompt as it is."""
    if consumer.reads_whole_prompt:
        return KeptPrompt(batch, [None] * len(requests), [None] * len(requests))
    selecting = clock.start("prompt_selection")
    kept = keep_prompt(consumer.method, requests, prompts, draft_prompts, consumer.rows, view, pair.tokenizer,
                       pad_token(pair.tokenizer), pair.tokenizer_mismatch is not None, batch.input_ids.device)
    clock.add("prompt_selection", clock.now() - selecting)
    return kept


def draft_pass(pair: ModelPair, requests: list[Request], prompts: list[EncodedPrompt], batch: PaddedBatch,
               consumers: list[Consumer], clock: Clock) -> tuple[list[EncodedPrompt], list[DraftView | None]]:
    """One draft pass for every consumer that asks the draft for something; each gets its own view.
    Returns the prompts as the draft read them (in its own tokens when its tokenizer differs)."""
    users = [i for i, c in enumerate(consumers) if c.need.needed]
    views: list[DraftView | None] = [None] * len(consumers)
    if not users:
        return prompts, views
    if pair.draft is None:
        raise ConfigError(f"method {consumers[users[0]].method.name!r} needs a draft model; load the pair with a draft")
    cross = pair.tokenizer_mismatch is not None
    for i in users:
        if cross and consumers[i].probes_lookahead:
            raise TokenizerMismatchError(
                f"method {consumers[i].method.name!r} passes the draft's lookahead tokens to the target, which needs "
                f"the same tokenizer ({pair.tokenizer_mismatch}); prompt methods "
                f"({', '.join(names('prompt only'))}) work across tokenizers")
    draft_tokenizer = pair.draft.tokenizer
    draft_prompts, draft_batch = prompts, batch
    if cross:  # the draft reads the prompt in its own tokens; station 1 crosses back as text
        draft_prompts = encode_prompts(draft_tokenizer, requests)
        draft_batch = pad_prompts([p.ids for p in draft_prompts], pad_token(draft_tokenizer), batch.input_ids.device)
    for row, prompt in enumerate(draft_prompts):
        check_fits(pair.draft.model.config, "draft", len(prompt.ids), max(consumers[i].need.lookahead[row] for i in users))
    drafted = run_draft(pair.draft.model, draft_batch, [consumers[i].need for i in users],
                        eos_ids(pair.draft.model, draft_tokenizer), pad_token(draft_tokenizer), clock, pair.decode)
    for i, view in zip(users, drafted, strict=True):
        views[i] = view
    return draft_prompts, views


def read_target(pair: ModelPair, requests: list[Request], consumers: list[Consumer],
                views: Callable[[], list[DraftView | None]], batch: PaddedBatch, prompts: list[EncodedPrompt] | None,
                clock: Clock, own_clocks: list[Clock]) -> Iterator[tuple[int, TargetSide]]:
    """One target prefill of `batch` for the consumers that read it, scored for each of them; then
    station 2 per consumer (yielded one at a time, each on its own copy of the cache but the last,
    which takes the cache itself); a checked guess's accepted tokens join the cache after station 2.
    `views()`: the consumers' draft views, asked for after the prefill (the draft may still be running
    beside it). `prompts`: the prompts the batch holds (None when it holds a prompt stage's kept tokens)."""
    scored = score_prompt(pair, requests, consumers, views, batch, prompts, clock, own_clocks)
    cache = scored.cache
    entry_bytes = bytes_per_entry(cache)
    windows = [(layer.sliding_window, layer_entry_bytes(layer)) for layer in cache.layers
               if layer.is_sliding]
    last = len(consumers) - 1
    for index, (consumer, scores, own) in enumerate(zip(consumers, scored.scores, own_clocks, strict=True)):
        copy = index < last
        if consumer.drops_entries:
            selecting = own.start("compression")
            own_cache, mask, kept_rows = kv_stage(consumer.method, cache, batch, scores, consumer.rows, copy=copy)
            own.add("compression", own.now() - selecting)
        else:  # dense: the full cache (a copy of it while others still need it)
            own_cache = clone_cache(cache) if copy else cache
            mask, kept_rows = batch.attention_mask, [None] * len(batch.lengths)
        if not copy:  # the last consumer took the cache (or its ragged copy): the full prefill is let go
            cache = scored.cache = None
        stored = kv_bytes(own_cache)
        accepted = scored.accepted[index]
        if accepted is not None:  # the guess tokens the target agreed with keep the entries its check made
            mask = keep_accepted(own_cache, mask, accepted, scored.reads[index])
        yield index, TargetSide(own_cache, scored.first_logits, mask, kept_rows, scores, entry_bytes, windows,
                                stored, len(consumers) > 1, scored.guesses[index], accepted)


def keep_accepted(cache: DynamicCache, attention_mask: torch.Tensor | None, accepted: list[Accepted | None],
                  read: GuessReading) -> torch.Tensor | None:
    """Add to a consumer's cache the entries of each row's accepted guess tokens (all of a row's accepted
    tokens but the last, which its decode feeds first); returns the row mask over the longer cache."""
    counts = [len(row.token_ids) - 1 if row is not None else 0 for row in accepted]
    if not max(counts):
        return attention_mask
    valid = torch.arange(max(counts))[None, :] < torch.tensor(counts)[:, None]
    entries = [(keys[:, :, : max(counts)], values[:, :, : max(counts)]) for keys, values in read.entries]
    return append_entries(cache, entries, valid.to(entries[0][0].device), attention_mask)


@dataclass
class ScoredPrompt:
    """The target's prefill of a batch with what scored it: per consumer, its scores and the guess
    that probed the cache for it."""

    cache: DynamicCache | None  # None once the last consumer has taken it
    first_logits: torch.Tensor  # [B, V], the last prompt position's
    scores: list[list[torch.Tensor] | None]  # per consumer: per compressed layer [B, H_kv, S]
    guesses: list[DraftView | None]
    accepted: list[list[Accepted | None] | None]  # per consumer that checks its guess: per row, its first tokens
    reads: list[GuessReading | None]  # per consumer: what the target computed while reading its guess


@dataclass
class Reading:
    """What a KV scorer may read of the target after its prefill (methods.TargetReading)."""

    model: torch.nn.Module
    tokenizer: object
    cache: DynamicCache
    batch: PaddedBatch
    prompts: list[EncodedPrompt] | None
    clock: Clock

    def probe(self, tokens: list[list[int]], counted: list[list[bool]], collector: WindowCollector,
              stage: str) -> None:
        view = lookahead_view(tokens, pad_token(self.tokenizer), self.batch.input_ids.device)
        valid = torch.zeros_like(view.lookahead_valid)
        for row, marks in enumerate(counted):
            valid[row, : len(marks)] = torch.tensor(marks, dtype=torch.bool)
        probe(self.model, self.cache, self.batch, view, [(collector, valid)], self.clock, stage, scoring_stage=stage)

    def full_layer_keys(self) -> list[torch.Tensor]:
        return [self.cache.layers[at].keys for at in compressed_layers(self.cache)]


def score_prompt(pair: ModelPair, requests: list[Request], consumers: list[Consumer],
                 views: Callable[[], list[DraftView | None]], batch: PaddedBatch,
                 prompts: list[EncodedPrompt] | None, clock: Clock, own_clocks: list[Clock]) -> ScoredPrompt:
    """The target prefill with every consumer's collectors, then the guesses that probe the full cache:
    the draft's lookahead once, as long as the longest view (each collector counts its own tokens),
    and each target guess (LAQ++'s pseudo-answer), checked where the consumer checks its guess; then each
    scorer's scores. A scorer's own reading of
    the target (KVzip's reconstruction) runs once for the consumers that share the scorer, and its stages
    count in their own timings."""
    target, tokenizer = pair.target.model, pair.tokenizer
    # Consumers that score the prompt alike (one method at two budgets, LAQ++'s stage one and SnapKV) share
    # one collector through the prefill; each then goes on with its own copy for its own probe.
    scorers = dict.fromkeys(s for c in consumers for s in (c.kv_scorer, c.stage_one_scorer) if s is not None)
    prefill_collectors = {s: s.collector(batch.width) for s in scorers}
    cache, first_logits = target_prefill(target, batch, [c for c in prefill_collectors.values() if c is not None],
                                         clock)
    collectors = [prefill_collectors[c.kv_scorer].copy() if c.kv_scorer is not None
                  and prefill_collectors[c.kv_scorer] is not None else None for c in consumers]
    views = views()

    probes = [view if consumer.probes_lookahead and collector is not None and view is not None
              and view.lookahead_ids.shape[1] > 0 else None
              for consumer, collector, view in zip(consumers, collectors, views, strict=True)]
    reads: list[GuessReading | None] = [None] * len(consumers)  # what a check of each consumer's guess reads
    if any(view is not None for view in probes):
        longest = max((view for view in probes if view is not None), key=lambda v: v.lookahead_ids.shape[1])
        width = longest.lookahead_ids.shape[1]
        read = probe(target, cache, batch, longest,
                     [(collector, F.pad(view.lookahead_valid, (0, width - view.lookahead_valid.shape[1])))
                      for collector, view in zip(collectors, probes, strict=True) if view is not None], clock,
                     check=any(c.checks_guess for c, view in zip(consumers, probes, strict=True) if view is not None))
        reads = [read if view is not None else None for view in probes]
    for index, (consumer, collector) in enumerate(zip(consumers, collectors, strict=True)):
        if consumer.guess is None:
            continue
        stage_one = prefill_collectors[consumer.stage_one_scorer] if consumer.stage_one_scorer is not None else None
        probes[index] = answer = pseudo_answer(
            target, cache, first_logits, batch, consumer.guess, stage_one.layer_scores() if stage_one is not None
            else None, consumer.rows, eos_ids(target, tokenizer), pad_token(tokenizer), clock, pair.decode)
        if answer.lookahead_ids.shape[1] > 0:
            reads[index] = probe(target, cache, batch, answer, [(collector, answer.lookahead_valid)], clock,
                                 check=consumer.checks_guess)
    checked = [check_guesses(view, read, first_logits, requests, consumer.rows)
               if consumer.checks_guess and read is not None else None
               for consumer, view, read in zip(consumers, probes, reads, strict=True)]
    for index, consumer in enumerate(consumers):  # correct and re-guess where the check stopped
        fresh = prefill_collectors.get(consumer.kv_scorer)
        if consumer.rounds and checked[index] is not None and fresh is not None:
            probes[index], collector, reads[index], checked[index] = guess_again(
                target, cache, batch, probes[index], list(checked[index]), reads[index], consumer.rounds,
                [row.lookahead for row in consumer.rows], fresh.copy, requests, first_logits,
                eos_ids(target, tokenizer), pad_token(tokenizer), clock)
            collectors[index] = collector or collectors[index]
    scores: list[list[torch.Tensor] | None] = []
    read_once: dict[KVScorer, tuple[list[torch.Tensor], Clock]] = {}  # scorers without a collector of their own
    for consumer, collector, own in zip(consumers, collectors, own_clocks, strict=True):
        scorer = consumer.kv_scorer
        if scorer is None:
            scores.append(None)
            continue
        if collector is None and scorer in read_once:
            shared, reading_clock = read_once[scorer]
        else:
            reading_clock = Clock(clock.device, clock.observer)
            shared = scorer.scores(collector, Reading(target, tokenizer, cache, batch, prompts, reading_clock))
            if collector is None:
                read_once[scorer] = shared, reading_clock
        for stage, seconds in reading_clock.stages.items():
            own.stages[stage] = own.stages.get(stage, 0.0) + seconds
        scores.append(shared)
    return ScoredPrompt(cache, first_logits, scores, probes, checked, reads)
