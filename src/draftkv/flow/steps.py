"""The flow's steps: padding a batch, the model calls (prefill, draft pass, probe, pseudo-answer) and
the clock that times them. Each step does one thing to a batch; execute.py puts them in order.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import torch
from transformers import DynamicCache

from ..engine import scoring
from ..engine.attention import Collector, RowSlot, WindowCollector, capture
from ..engine.cache import checkpoint, clone_cache, gathered_copy, new_cache, newest_entries, select_rows
from ..engine.decoding import Accepted, DecodeSpec, decode, make_generators, takes_static, token_logprobs
from ..engine.speculation import check_guess
from ..errors import PromptError
from ..methods import Method, PseudoAnswer
from ..types import Request
from .batch import DraftCache, DraftView, PaddedBatch, left_padded, lookahead_view
from .select import DRAFT_WINDOW, row_mask, select_kv

if TYPE_CHECKING:
    from .plan import DraftNeed, RowPlan


@dataclass(frozen=True)
class StageEvent:
    """A stage starts, or ends after `seconds` (what an observer of the executor is told)."""

    stage: str
    event: Literal["start", "end"]
    seconds: float = 0.0


Observer = Callable[[StageEvent], None]


@dataclass
class Clock:
    """Stage timings in seconds (synchronising the CUDA stream so the numbers mean something), told to an observer."""

    device: torch.device
    observer: Observer | None = None
    stages: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        if self.device.type == "cuda":  # this thread's stream: the draft may run beside on another
            torch.cuda.current_stream(self.device).synchronize()
        return time.perf_counter()

    def start(self, stage: str) -> float:
        """The time a stage starts at; the observer hears of it first."""
        if self.observer is not None:
            self.observer(StageEvent(stage, "start"))
        return self.now()

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds
        if self.observer is not None:
            self.observer(StageEvent(stage, "end", seconds))


def eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    ids = {ids} if isinstance(ids, int) else set(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def check_fits(config, role: str, prompt_length: int, extra_tokens: int) -> None:
    """The prompt and the tokens asked for fit the model's context (from its config alone)."""
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and prompt_length + extra_tokens > limit:
        raise PromptError(
            f"the prompt has {prompt_length} tokens and {extra_tokens} more are asked for, past the {role}'s "
            f"context limit of {limit} tokens; shorten the context or ask for fewer new tokens"
        )


def check_probes(method: Method, config, prompt_length: int, tokenizer) -> list[tuple[int, int]]:
    """The probes `method` reads after the target's prefill (KVzip's reconstruction), each checked to fit
    the target's context beside the prompt; returns them as (tokens added, tokens repeated)."""
    probes = method.reading_probes(prompt_length, tokenizer)
    longest = max((added + repeated for added, repeated in probes), default=0)
    limit = getattr(config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and prompt_length + longest > limit:
        raise PromptError(
            f"method {method.name} reads the prompt back in probes of up to {longest} tokens (its instruction "
            f"or hint and a chunk), which with the prompt's {prompt_length} pass the target's context limit of "
            f"{limit} tokens; give a smaller chunk or a shorter instruction, or shorten the context")
    return probes


# Logits per LM-head chunk: 2**24 floats is 64 MiB, a fraction of a long prompt's prefill peak.
_LM_HEAD_CHUNK = 2**24


def self_information(model: torch.nn.Module, hidden: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    """-log p(token | prefix) of every prompt column under the draft [B, N], from its last hidden
    states [B, N, d]; a row's first token gets inf.

    The LM head runs in chunks of positions, so the [N, vocabulary] logits never exist at once, and
    -log p is logsumexp - logit, so no second [chunk, vocabulary] tensor (log_softmax's) is made.
    """
    head = model.get_output_embeddings()
    batch_size, width = batch.input_ids.shape
    scores = torch.zeros(batch_size, width, dtype=scoring.SCORE_DTYPE, device=hidden.device)
    chunk = max(1, _LM_HEAD_CHUNK // (batch_size * head.weight.shape[0]))
    for start in range(0, width - 1, chunk):
        stop = min(start + chunk, width - 1)
        logits = head(hidden[:, start:stop]).to(scoring.SCORE_DTYPE)
        next_logits = logits.gather(-1, batch.input_ids[:, start + 1: stop + 1, None])[..., 0]
        scores[:, start + 1: stop + 1] = torch.logsumexp(logits, dim=-1) - next_logits
    for row in range(batch_size):
        scores[row, batch.width - batch.lengths[row]] = float("inf")  # nothing predicts the first token
    return scores


def prefill(model: torch.nn.Module, batch: PaddedBatch, cache: DynamicCache | None,
            collectors: list[Collector]) -> torch.Tensor:
    """The model reads the prompts (into `cache` when given); returns the last position's logits [B, V].

    A padded batch is read one row at a time, each without its padding: attention over left-padded rows
    needs a [B, 1, N, N] mask, which rules out the fused flash kernel and is gigabytes by itself at
    32k tokens (H100, dense, batch 8 at 32k: 10.9 s and a 36.6 GB peak, row by row 3.9 s and 9.2 GB).
    Each row's cache goes into `cache` left-padded with zeros (the decode mask hides them), and each
    collector puts the row's scores at the row's own columns."""
    if batch.attention_mask is None:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, cache=cache,
                    use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1]
    logits, row_layers = [], []
    for row in range(len(batch.lengths)):
        pad = batch.pad(row)
        row_cache = new_cache(model.config) if cache is not None else None
        for collector in collectors:
            collector.slot = RowSlot(row, pad, len(batch.lengths))
        try:
            out = model(input_ids=batch.input_ids[row:row + 1, pad:], position_ids=batch.position_ids[row:row + 1, pad:],
                        cache=row_cache, use_cache=row_cache is not None, logits_to_keep=1)
        finally:
            for collector in collectors:
                collector.slot = None
        logits.append(out.logits[:, -1])
        if row_cache is not None:
            row_layers.append([(layer.keys, layer.values) for layer in row_cache.layers])
        del out, row_cache
    if cache is not None:
        for index in range(len(row_layers[0])):
            keys = left_padded([layers[index][0] for layers in row_layers], dim=2)
            values = left_padded([layers[index][1] for layers in row_layers], dim=2)
            for layers in row_layers:  # the rows' copies go as each layer's batch copy is made
                layers[index] = None
            cache.update(keys, values, index)
    return torch.cat(logits)


def run_draft(model: torch.nn.Module, batch: PaddedBatch, needs: list[DraftNeed], eos: set[int], pad_id: int,
              clock: Clock, backend: str = "eager") -> list[DraftView]:
    """One draft prefill + greedy lookahead (its own cache is discarded afterwards) serving every need.

    The lookahead runs as long as the longest need asks, and each need gets the first tokens of it
    (greedy decoding is causal, so exactly what a shorter run gives) with the prompt scores of its
    own collector, which counts only the steps of its own lookahead."""
    device = batch.input_ids.device
    started = clock.start("draft_prefill")
    collectors = [need.scorer.collector(batch.width, model.config.num_hidden_layers) if need.scorer is not None
                  else None for need in needs]
    # One request whose decode will speculate keeps the draft's cache: its own window and lookahead
    # queries score it, so it can be compressed like SpecKV compresses the target's.
    keeping = any(need.keeps_cache for need in needs) and len(batch.lengths) == 1
    own = own_scorer(batch.width, DRAFT_WINDOW) if keeping and any(need.scores_cache for need in needs) else None
    active = [c for c in [*collectors, own] if c is not None]
    # When the lookahead scores the prompt, each lookahead token must be fed too: one step more.
    steps = [max(length + 1 if collector is not None and length > 0 else length
                 for need, collector in zip(needs, collectors, strict=True) for length in [need.lookahead[row]])
             for row in range(len(batch.lengths))]
    hidden: list[torch.Tensor] = []
    keep_hidden = None
    if any(need.scorer is not None and need.scorer.reads_hidden for need in needs):  # the decoder's last hidden states, before the LM head's slice
        keep_hidden = model.get_decoder().register_forward_hook(
            lambda _module, _args, output: hidden.append(output.last_hidden_state))
    # Without lookahead steps (LLMLingua-style alone) the draft needs no cache of its own.
    cache = new_cache(model.config) if max(steps) > 0 else None
    guessing_again = cache is not None and any(need.guesses_again for need in needs)

    def scoring_seconds() -> float:
        return sum(c.seconds for c in active)

    with capture(model, *active):
        try:
            last_logits = prefill(model, batch, cache, active)
        finally:
            if keep_hidden is not None:
                keep_hidden.remove()
        prefilled = clock.now()
        prefill_scoring = scoring_seconds()
        clock.add("draft_prefill", prefilled - started - prefill_scoring)
        back_to_prompt = checkpoint(cache) if guessing_again else None
        # Collectors read every step's queries in Python: a replayed graph would skip them, and they keep
        # every row's scores, so the batch stays whole (as a draft that guesses again keeps its cache whole).
        whole = bool(active) or guessing_again
        decoded = decode(model, cache, last_logits, torch.tensor(batch.next_positions, device=device),
                         batch.attention_mask,
                         DecodeSpec.greedy(steps, eos, "eager" if whole else backend, compact=not whole))
    kept = None
    if keeping and cache is not None:
        # The request's decode goes on from this cache: the prompt and the lookahead tokens the decode
        # fed (none when the static step read the cache into slots of its own).
        kept = DraftCache(cache, batch.next_positions[0], cache.layers[0].get_seq_length() - batch.width,
                          own.layer_scores() if own is not None else None)
    again = None
    if back_to_prompt is not None:
        if kept is not None:  # the speculating consumer goes on from its own copy of the guess
            kept = replace(kept, cache=clone_cache(kept.cache))
        back_to_prompt()
        again = Redraft(model, cache, batch, eos, pad_id)
    del cache
    clock.add("draft_lookahead", clock.now() - prefilled - (scoring_seconds() - prefill_scoring))
    scoring_started = clock.now()
    information = self_information(model, left_padded(hidden, dim=1), batch) if hidden else None
    views = []
    for need, collector in zip(needs, collectors, strict=True):
        view = lookahead_view([row.token_ids[:length] for row, length in zip(decoded.rows, need.lookahead, strict=True)],
                              pad_id, device)
        if need.scorer is not None:
            # Step 0 is the prefill's window; step t feeds lookahead token t.
            step_valid = torch.cat([torch.ones(len(steps), 1, dtype=torch.bool, device=device), view.lookahead_valid], 1)
            view.token_scores = need.scorer.token_scores(collector, step_valid, information)
        if need.guesses_again:
            view.again = again
        if need.keeps_cache and kept is not None:  # each consumer that goes on from it has its own
            view.kept = kept if not any(v.kept is kept for v in views) else replace(kept, cache=clone_cache(kept.cache))
        views.append(view)
    if active or information is not None:
        clock.add("draft_scoring", clock.now() - scoring_started + scoring_seconds())
    return views


@dataclass
class Redraft:
    """The draft after its prefill, its cache holding the prompt alone: it guesses an answer again from a
    corrected beginning (`again`) without reading the prompt again."""

    model: torch.nn.Module
    cache: DynamicCache
    batch: PaddedBatch
    eos: set[int]
    pad_id: int

    def again(self, rows: list[int], beginnings: list[list[int]], lengths: list[int]) -> list[list[int]]:
        """Per row of `rows`: the draft's greedy tokens after its prompt and `beginnings[i]`, at most
        `lengths[i]` of them. Each row reads its beginning into a copy of its own prompt's cache (right-padded
        to the longest, the padding masked), then guesses on."""
        device = self.batch.input_ids.device
        index = torch.tensor(rows, device=device)
        width = max(len(ids) for ids in beginnings)
        cache = select_rows(self.cache, index, width + max(lengths))
        ids = torch.tensor([ids + [self.pad_id] * (width - len(ids)) for ids in beginnings], device=device)
        read = torch.tensor([[True] * len(ids) + [False] * (width - len(ids)) for ids in beginnings], device=device)
        prompt = self.batch.attention_mask[index] if self.batch.attention_mask is not None \
            else torch.ones(len(rows), self.batch.width, dtype=torch.long, device=device)
        mask = torch.cat([prompt, read.to(prompt.dtype)], 1)
        starts = torch.tensor([self.batch.next_positions[row] for row in rows], device=device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=starts[:, None] + torch.arange(width, device=device),
                         cache=cache, use_cache=True, logits_to_keep=0)
        last = out.logits[torch.arange(len(rows), device=device), torch.tensor([len(b) - 1 for b in beginnings],
                                                                               device=device)]
        del out
        decoded = decode(self.model, cache, last, starts + torch.tensor([len(b) for b in beginnings], device=device),
                         mask, DecodeSpec.greedy(lengths, self.eos, "eager", compact=False))
        return [row.token_ids for row in decoded.rows]


def own_scorer(width: int, window: int) -> WindowCollector:
    """A collector of the draft's own last `window` prompt queries and every lookahead query over its
    `width` prompt columns, for compressing the draft's cache (SpecKV applied to the draft)."""
    collector = WindowCollector(width, "max")
    collector.score_last(window)
    return collector


def target_prefill(model: torch.nn.Module, batch: PaddedBatch, collectors: list[Collector],
                   clock: Clock) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill the prompt alone (so its KV entries are exactly dense prefill's) while the collectors
    score it; returns the cache and the last prompt position's logits."""
    started = clock.start("target_prefill")
    cache = new_cache(model.config)
    before = sum(c.seconds for c in collectors)
    with capture(model, *collectors):
        last_logits = prefill(model, batch, cache, collectors)
    scoring = sum(c.seconds for c in collectors) - before
    clock.add("target_prefill", clock.now() - started - scoring)
    clock.add("scoring", scoring)
    return cache, last_logits


@dataclass
class GuessReading:
    """What the target computed while it read a guess: its logits at every guess position [B, L, V] and
    the guess's own entries per layer ([B, H_kv, J, d], J <= L), for a check of the guess."""

    logits: torch.Tensor
    entries: list[tuple[torch.Tensor, torch.Tensor]]

    @property
    def room(self) -> int:
        """Guess tokens whose entries were kept (a sliding window may hold fewer than the guess)."""
        return self.entries[0][0].shape[2]


def probe(model: torch.nn.Module, cache: DynamicCache, batch: PaddedBatch, guess: DraftView,
          scorers: list[tuple[WindowCollector, torch.Tensor]], clock: Clock, stage: str = "probe",
          scoring_stage: str = "scoring", check: bool = False) -> GuessReading | None:
    """Read a guessed answer after the prompt so its queries score the prompt, then drop its entries;
    with `check`, keep what a check of the guess needs (GuessReading).

    scorers: each collector with the guess tokens it counts ([B, L] bool); causal attention makes a
    shorter guess exactly the first tokens of a longer one."""
    width = guess.lookahead_ids.shape[1]
    for collector, valid in scorers:
        collector.score_last(width, valid)
    mask = None
    if batch.attention_mask is not None:
        mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch.lengths), width)], 1)
    device = cache.layers[0].keys.device
    positions = torch.tensor(batch.next_positions, device=device)[:, None] + torch.arange(width, device=device)
    collectors = [collector for collector, _ in scorers]
    started, before = clock.start(stage), sum(c.seconds for c in collectors)
    restore = checkpoint(cache)
    with capture(model, *collectors):
        out = model(input_ids=guess.lookahead_ids, attention_mask=mask, position_ids=positions,
                    cache=cache, use_cache=True, logits_to_keep=0 if check else 1)
    read = GuessReading(out.logits.float(), newest_entries(cache, width)) if check else None
    del out
    restore()
    scoring = sum(c.seconds for c in collectors) - before
    clock.add(stage, clock.now() - started - scoring)
    clock.add(scoring_stage, scoring)
    return read


def check_guesses(guess: DraftView, read: GuessReading, first_logits: torch.Tensor, requests: list[Request],
                  rows: list[RowPlan]) -> list[Accepted | None]:
    """Per row that dropped entries, the answer's first tokens from the target's check of its guess
    (engine.speculation.check_guess), with their log-probabilities where the request asks and the
    row's sampler, which goes on into the decode."""
    accepted: list[Accepted | None] = []
    for row, (request, planned) in enumerate(zip(requests, rows, strict=True)):
        length = min(guess.lengths[row], read.room)
        if not planned.drops_entries or length == 0:
            accepted.append(None)
            continue
        logits = torch.cat([first_logits[row: row + 1].float(), read.logits[row, :length]])
        generator = make_generators([request.sampling], first_logits.device)[0]
        tokens = check_guess(guess.lookahead_ids[row, :length].tolist(), logits, request.sampling, generator)
        logprobs = None
        if request.logprobs is not None:
            logprobs = token_logprobs(logits[: len(tokens)], tokens, [request.logprobs] * len(tokens))
        accepted.append(Accepted(tokens, logprobs, generator))
    return accepted


def guess_again(model: torch.nn.Module, cache: DynamicCache, batch: PaddedBatch, guess: DraftView,
                accepted: list[Accepted | None], read: GuessReading, rounds: int, room: list[int],
                fresh: Callable[[], WindowCollector], requests: list[Request], first_logits: torch.Tensor,
                eos: set[int], pad_id: int, clock: Clock) -> tuple[DraftView, WindowCollector | None, GuessReading,
                                                                   list[Accepted | None]]:
    """Correct and re-guess: where the target's check of a row's guess stopped inside it, the row's first
    tokens (the agreed part and the target's own token there) start a new guess, which the draft writes
    from there up to `room[row]` tokens in all, and the target checks over its full cache, the kept tokens
    as they are and the new ones as the first check did. At most `rounds` times, until every row's guess
    is kept whole, its answer ends or its room is used. Every round's reading probes the prompt with a
    `fresh()` collector, so the last one scores the cache from the kept tokens and the last guess.
    Returns the last guesses, their collector (None when no round ran), reading and first tokens."""
    sequences = [guess.lookahead_ids[row, : guess.lengths[row]].tolist() for row in range(len(accepted))]
    collector = None
    for _ in range(rounds):
        going = [row for row, kept in enumerate(accepted) if kept is not None
                 and len(kept.token_ids) <= min(len(sequences[row]), read.room)  # the check stopped inside
                 and kept.token_ids[-1] not in eos and len(kept.token_ids) < room[row]]
        if not going:
            break
        started = clock.start("guess_again")
        written = guess.again.again(going, [accepted[row].token_ids for row in going],
                                    [room[row] - len(accepted[row].token_ids) for row in going])
        for row, tokens in zip(going, written, strict=True):
            sequences[row] = accepted[row].token_ids + tokens
        guess = replace(lookahead_view(sequences, pad_id, first_logits.device), again=guess.again)
        clock.add("guess_again", clock.now() - started)
        collector = fresh()
        read = probe(model, cache, batch, guess, [(collector, guess.lookahead_valid)], clock, check=True)
        for row in going:
            kept, request = accepted[row], requests[row]
            logits = torch.cat([first_logits[row: row + 1].float(), read.logits[row, : len(sequences[row])]])
            start = len(kept.token_ids)  # logits[j] is the target's distribution of token j
            tokens = kept.token_ids + check_guess(sequences[row][start:], logits[start:], request.sampling,
                                                  kept.generator)
            logprobs = token_logprobs(logits[: len(tokens)], tokens, [request.logprobs] * len(tokens)) \
                if request.logprobs is not None else None
            accepted[row] = Accepted(tokens, logprobs, kept.generator, kept.rounds + 1)
    return guess, collector, read, accepted


def pseudo_answer(model: torch.nn.Module, cache: DynamicCache, first_logits: torch.Tensor, batch: PaddedBatch,
                  guess: PseudoAnswer, stage_one_scores: list[torch.Tensor] | None, rows: list[RowPlan],
                  eos: set[int], pad_id: int, clock: Clock, backend: str = "eager") -> DraftView:
    """The target's own guess of the answer, for the rows it compresses: greedy tokens from a copy of its
    cache, compressed by the guess's stage one (LAQ++) or whole (an oracle)."""
    started = clock.start("pseudo_answer")
    if guess.stage_one is not None:
        index, valid, _ = select_kv(guess.stage_one, stage_one_scores, batch, rows)
        copy = gathered_copy(cache, index)
        _, mask = row_mask(valid)  # stage one (SnapKV) is uniform per row
        mask = mask.to(first_logits.device) if mask is not None else None
    else:  # the static step reads the cache into its own slots and leaves it as it was: no copy needed
        copy = cache if takes_static(backend, model, cache) else clone_cache(cache)
        mask = batch.attention_mask
    decoded = decode(model, copy, first_logits, torch.tensor(batch.next_positions, device=first_logits.device), mask,
                     DecodeSpec.greedy([guess.tokens if row.drops_entries else 0 for row in rows], eos, backend))
    clock.add("pseudo_answer", clock.now() - started)
    return lookahead_view([row.token_ids for row in decoded.rows], pad_id, first_logits.device)


def peak_memory(device: torch.device) -> int:
    """CUDA: bytes allocated at the peak of this request. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024
