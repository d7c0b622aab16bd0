"""The finish step: decode each consumer's prepared batch and build the only `Stats`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ..engine.attention import capture, ragged_attention
from ..engine.cache import kv_bytes, new_cache, stacked_cache
from ..engine.decoding import Accepted, Decoded, DecodeSpec, TextCallback, decode
from ..engine.eviction import DecodeEviction
from ..engine.speculation import AutoProposals, Drafter, SpeculationStats, drop_newest, speculate
from ..methods import Method
from ..prompt import EncodedPrompt
from ..types import Request, Result, Stats
from .batch import DraftView, PaddedBatch
from .plan import Consumer
from .select import DRAFT_WINDOW, KeptPrompt, keep_of_draft
from .steps import Clock, eos_ids, own_scorer, peak_memory, prefill

if TYPE_CHECKING:
    from ..models import ModelPair


@dataclass
class TargetSide:
    """What the target's prefill and station 2 left for one consumer: its cache, ready to decode."""

    cache: DynamicCache | None  # the (compressed) cache; None once a joint decode took it
    first_logits: torch.Tensor  # [B, V], the last prompt position's logits
    attention_mask: torch.Tensor | None  # [B, physical cache length]; None when no row is padded
    kept_rows: list[list[torch.Tensor] | None]  # per row, per layer [H_kv, kept] station-1 positions (None: all)
    layer_scores: list[torch.Tensor] | None  # per compressed layer [B, H_kv, S], the scorer's scores
    entry_bytes: int  # one position's keys and values over the compressed (full-attention) layers
    sliding_windows: list[tuple[int, int]]  # per sliding-window layer: its window, bytes per entry
    stored_bytes: int  # what the batch's cache tensors hold right after compression, padding included
    shared_prefill: bool  # the target prefill served other consumers too
    guess: DraftView | None  # the guessed answer that probed the cache: the draft's, or the target's own
    accepted: list[Accepted | None] | None = None  # per row, the answer's first tokens from the check of the guess


@dataclass
class Prepared:
    """One consumer's batch after both stations: its plan, what station 1 kept and the target's side."""

    consumer: Consumer  # the plan for this method over the batch
    requests: list[Request]
    prompts: list[EncodedPrompt]  # the full prompts, as the target's tokenizer encodes them
    kept: KeptPrompt  # what station 1 kept, and the batch the target read
    draft: DraftView | None  # this consumer's view of the draft pass
    clock: Clock  # this consumer's stages: its own and those it shared
    started: float
    target: TargetSide | None = None  # None: the target was not run (prompt compression alone)
    dtype: str = ""  # what the models ran in ("bfloat16", "float32", ...)

    @property
    def method(self) -> Method:
        return self.consumer.method

    @property
    def batch(self) -> PaddedBatch:
        return self.kept.batch

    @property
    def kv_budgets(self) -> list[int | None]:
        return [row.kv_budget for row in self.consumer.rows]

    @property
    def cache(self) -> DynamicCache | None:
        return self.target.cache if self.target is not None else None

    @property
    def first_logits(self) -> torch.Tensor:
        return self.target.first_logits

    @property
    def attention_mask(self) -> torch.Tensor | None:
        return self.target.attention_mask

    @property
    def kept_rows(self) -> list[list[torch.Tensor] | None]:
        return self.target.kept_rows if self.target is not None else [None] * len(self.requests)

    @property
    def layer_scores(self) -> list[torch.Tensor] | None:
        return self.target.layer_scores

    @property
    def guess(self) -> DraftView | None:
        return self.target.guess if self.target is not None else None

    @property
    def accepted(self) -> list[Accepted | None]:
        accepted = self.target.accepted if self.target is not None else None
        return accepted if accepted is not None else [None] * len(self.requests)

    @property
    def next_positions(self) -> list[int]:
        """Where each row's decode goes on: after the prompt and the accepted tokens already in the cache."""
        return [position + (len(given.token_ids) - 1 if given is not None else 0)
                for position, given in zip(self.batch.next_positions, self.accepted, strict=True)]


def finish(pair: ModelPair, prepared: Prepared, on_text: TextCallback | None = None,
           cancelled: Callable[[int], bool] | None = None) -> list[Result]:
    """Decode a prepared batch (with decode-time eviction when the method asks, with the draft's
    proposals when the plan speculates) and build the results."""
    if prepared.consumer.speculation:
        return finish_speculating(pair, prepared, on_text, cancelled)
    requests, planned = prepared.requests, prepared.consumer.eviction
    target, clock = pair.target.model, prepared.clock
    eviction = None
    if planned is not None:
        scorer = prepared.consumer.kv_scorer
        eviction = DecodeEviction(scorer.decode_collector() if scorer is not None else None,
                                  prepared.method.keep_positions, planned.every, planned.budget)
    decoding = clock.start("decode")
    spec = answer_spec(pair, requests, prepared.accepted, on_text=on_text, cancelled=cancelled,
                       after_step=eviction.after_step if eviction is not None else None)
    with ragged_attention(target, prepared.cache), capture(target, eviction):
        output = decode(target, prepared.cache, prepared.first_logits,
                        torch.tensor(prepared.next_positions, device=target.device), prepared.attention_mask, spec)
    finished = clock.now()
    clock.add("decode", finished - max(decoding, output.first_token_at))
    notes = [f"decode-time eviction ran {eviction.evictions} times"] if eviction is not None else []
    return results_of(pair, prepared, output.rows, output.first_token_at, finished, peak_memory(target.device), notes)


def finish_speculating(pair: ModelPair, prepared: Prepared, on_text: TextCallback | None = None,
                       cancelled: Callable[[int], bool] | None = None) -> list[Result]:
    """Decode the batch with the draft proposing tokens (engine.speculation.speculate), its rows in step.
    A single request's draft goes on from its pass's cache where the method had one (cut back to the
    guess tokens the target kept); otherwise the draft first reads each row as the target read it, at
    the same positions, into a cache of the row's own, and the rows' caches are stacked."""
    target, draft, clock = pair.target.model, pair.draft.model, prepared.clock
    batch, rows = prepared.batch, len(prepared.requests)
    asked = [r.speculate if r.speculate is not None else pair.speculate for r in prepared.requests]
    drafter = Drafter(draft, None, prepared.consumer.speculation, list(batch.next_positions), [0] * rows,
                      widths=[None if width == "auto" else width for width in asked])
    kept = prepared.draft.kept if prepared.draft is not None and rows == 1 else None
    if prepared.consumer.adapts:
        costs = pair.speculation_costs()
        # The draft reads what the target prefilled; their calls' costs stand in for their prefills' ratio.
        reading = 0.0 if kept is not None else \
            clock.stages.get("target_prefill", 0.0) * costs.draft_step / costs.target_call(1)
        drafter.auto = AutoProposals(costs, reading)
    if kept is not None:
        accepted = prepared.accepted[0]
        valid = min(len(accepted.token_ids) - 1 if accepted is not None else 0, kept.read)
        width = kept.cache.layers[0].get_seq_length() - kept.read
        drop_newest(kept.cache, kept.read - valid)
        keep_of_draft(kept.cache, kept.scores, width, valid, prepared.consumer.rows[0].draft_budget, pair.draft_cache)
        drafter.cache, drafter.positions, drafter.read = kept.cache, [kept.position], [valid]
        prepared.draft.kept = None  # the decode takes it
    else:
        def fill() -> None:  # the draft reads each row without the batch's padding, once a proposal is wanted
            reading = clock.start("speculation_prefill")
            caches = []
            for row in range(rows):
                cache = new_cache(draft.config)
                own = [own_scorer(batch.lengths[row], DRAFT_WINDOW)] if prepared.consumer.draft_scored else []
                pad = batch.pad(row)
                with capture(draft, *own):
                    prefill(draft, PaddedBatch(batch.input_ids[row:row + 1, pad:], None,
                                               batch.position_ids[row:row + 1, pad:], [batch.lengths[row]],
                                               [batch.next_positions[row]]), cache, own)
                keep_of_draft(cache, own[0].layer_scores() if own else None, batch.lengths[row], 0,
                              prepared.consumer.rows[row].draft_budget, pair.draft_cache)
                caches.append(cache)
            drafter.row_bytes = [kv_bytes(cache) for cache in caches]
            drafter.cache = caches[0] if rows == 1 else stacked_cache(caches, [None] * rows)
            clock.add("speculation_prefill", clock.now() - reading)

        drafter.fill = fill
    decoding = clock.start("decode")
    spec = answer_spec(pair, prepared.requests, prepared.accepted, on_text=on_text, cancelled=cancelled)
    with ragged_attention(target, prepared.cache):
        output, speculated = speculate(target, prepared.cache, prepared.first_logits, list(batch.next_positions),
                                       spec, drafter, prepared.attention_mask)
    drafter.cache = None  # the draft's cache goes with the decode
    drafting = sum(row.draft_seconds for row in speculated)
    clock.add("decode", clock.now() - max(decoding, output.first_token_at) - drafting
              - clock.stages.get("speculation_prefill", 0.0))
    clock.add("draft_decode", drafting)
    notes = [drafter.auto.declined] if drafter.auto is not None and drafter.auto.declined is not None else []
    return results_of(pair, prepared, output.rows, output.first_token_at, clock.now(), peak_memory(target.device),
                      notes, speculated)


def answer_spec(pair: ModelPair, requests: list[Request], accepted: list[Accepted | None], *,
                on_text: TextCallback | None = None, cancelled: Callable[[int], bool] | None = None,
                after_step: Callable[[DynamicCache], None] | None = None, consume: bool = True) -> DecodeSpec:
    """How the requests' answers are decoded, from the tokens each row starts with (`accepted`): the one
    place a request becomes a decode. `consume`: the cache is not needed afterwards (False: it is
    restored for the next question, as `ask` does)."""
    eos = eos_ids(pair.target.model, pair.tokenizer)
    return DecodeSpec([r.max_new_tokens for r in requests], [r.sampling for r in requests],
                      [set() if r.ignore_eos else eos for r in requests], tokenizer=pair.tokenizer,
                      stops=[r.stop for r in requests], logprobs=[r.logprobs for r in requests], on_text=on_text,
                      cancelled=cancelled, after_step=after_step, backend=pair.decode, consume=consume,
                      accepted=accepted)


def guessed(pair: ModelPair, prepared: Prepared, row: int) -> str | None:
    """The text of the guessed answer that probed a row's cache, if one did."""
    guess = prepared.guess
    if guess is None or not guess.lengths[row]:
        return None
    return pair.tokenizer.decode(guess.lookahead_ids[row][guess.lookahead_valid[row]].tolist(), skip_special_tokens=True)


def results_of(pair: ModelPair, prepared: Prepared, rows: list[Decoded], first_token_at: float, finished: float,
               memory: int | None, notes: list[str], speculated: list[SpeculationStats] | None = None) -> list[Result]:
    """The results of a prepared batch's decoded rows (`speculated`: each row's speculation)."""
    results = []
    for row, decoded in enumerate(rows):
        stats, kept_tokens, kept_kv = row_stats(prepared, row, len(decoded.token_ids), first_token_at, finished, memory,
                                                notes)
        if speculated is not None:
            mine = speculated[row]
            stats = replace(stats, speculation_rounds=mine.rounds, proposed_tokens=mine.proposed,
                            accepted_proposals=mine.accepted, draft_kv_bytes=mine.draft_kv_bytes)
        results.append(Result(decoded.text, decoded.token_ids, decoded.finish_reason, stats, kept_kv, kept_tokens,
                              decoded.logprobs, guessed(pair, prepared, row)))
    return results


def decode_groups(widths: list[int], entry_bytes: int, weight_bytes: int) -> list[list[int]]:
    """Which rows decode together. Each group's step reads the weights once and every row's cache padded
    to the group's widest; rows sorted by width are split where that costs least in bytes read per step."""
    order = sorted(range(len(widths)), key=lambda row: widths[row])
    best = [0] + [None] * len(order)  # best[i]: least cost of the first i rows in order
    cut = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end):
            cost = best[start] + weight_bytes + (end - start) * widths[order[end - 1]] * entry_bytes
            if best[end] is None or cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.insert(0, order[cut[end]: end])
        end = cut[end]
    return groups


def finish_together(pair: ModelPair, batches: list[Prepared]) -> list[list[Result]]:
    """Decode several prepared batches of the same requests (several settings of one sample) as one
    batch of their caches: each row keeps its own compressed cache, positions and stop rule, and the
    target's weights are read once per step for all. Those that cannot join (`decodes_together`)
    decode alone (the plan says which: `Consumer.joins_others`). Greedy tokens equal separate decodes up to float arithmetic over the padding."""
    results: list[list[Result] | None] = [None] * len(batches)
    joining = [i for i, prepared in enumerate(batches) if prepared.consumer.joins_others]
    for i in set(range(len(batches))) - set(joining):
        results[i] = finish(pair, batches[i])
    if not joining:
        return results
    weight_bytes = sum(p.numel() * p.element_size() for p in pair.target.model.parameters())
    widths = [sum(layer.get_seq_length() for layer in batches[i].cache.layers) for i in joining]
    entry_bytes = max(batches[i].target.entry_bytes for i in joining) // max(len(batches[joining[0]].cache.layers), 1)
    for group in decode_groups(widths, entry_bytes, weight_bytes):
        members = [batches[joining[i]] for i in group]
        for i, finished in zip(group, _decode_group(pair, members), strict=True):
            results[joining[i]] = finished
    return results


def _decode_group(pair: ModelPair, batches: list[Prepared]) -> list[list[Result]]:
    target = pair.target.model
    clock = Clock(target.device, batches[0].clock.observer)
    started = clock.start("decode")
    cache = stacked_cache([p.cache for p in batches], [p.attention_mask for p in batches])
    for prepared in batches:
        prepared.target.cache = None  # the stacked copy replaces it
    requests = [request for prepared in batches for request in prepared.requests]
    with ragged_attention(target, cache):
        output = decode(target, cache, torch.cat([p.first_logits for p in batches]),
                        torch.tensor([pos for p in batches for pos in p.next_positions], device=target.device),
                        None, answer_spec(pair, requests, [given for p in batches for given in p.accepted]))
    finished = clock.now()
    clock.add("decode", finished - max(started, output.first_token_at))
    memory = peak_memory(target.device)
    results, first = [], 0
    for prepared in batches:
        prepared.clock.stages["decode"] = prepared.clock.stages.get("decode", 0.0) + clock.stages["decode"]
        rows = output.rows[first: first + len(prepared.requests)]
        first += len(prepared.requests)
        results.append(results_of(pair, prepared, rows, output.first_token_at, finished, memory,
                                  [f"decoded in one batch with {len(batches) - 1} other settings"]
                                  if len(batches) > 1 else []))
    return results


def row_stats(prepared: Prepared, row: int, new_tokens: int, first_token_at: float, finished: float,
              memory: int | None, notes: Sequence[str] = (),
              ) -> tuple[Stats, torch.Tensor | None, list[torch.Tensor] | None]:
    """One row's stats, its station-1 kept tokens and its kept KV positions (in original prompt positions);
    `notes`: the caller's own, after what the plan says of the row."""
    planned, side = prepared.consumer.rows[row], prepared.target
    n = planned.prompt_length
    kept_tokens, kept_kv = prepared.kept.kept_tokens[row], prepared.kept_rows[row]
    stage_length = prepared.batch.lengths[row]
    if kept_kv is not None and kept_tokens is not None:
        kept_kv = [torch.where(positions >= 0, kept_tokens[positions.clamp(min=0)], -1) for positions in kept_kv]
    # Entries per layer and head: exact for uniform budgets, the mean for PyramidKV and Ada-KV.
    real = sum(int((positions >= 0).sum()) for positions in kept_kv) if kept_kv is not None else None
    slots = sum(positions.numel() // positions.shape[-1] for positions in kept_kv) if kept_kv is not None else 1
    entries = round(real / slots) if real is not None else stage_length
    entry_bytes = side.entry_bytes if side is not None else 0
    windows = side.sliding_windows if side is not None else []
    sliding_entries = max((min(stage_length, window - 1) for window, _ in windows), default=0)
    sliding = sum(min(stage_length, window - 1) * entry for window, entry in windows)
    sliding_dense = sum(min(n, window - 1) * entry for window, entry in windows)
    shared = ["shared prefill"] if side is not None and side.shared_prefill else []
    stats = Stats(
        method=prepared.method.name, dtype=prepared.dtype, prompt_tokens=n, kept_prompt_tokens=stage_length,
        kv_entries=entries,
        kv_bytes_dense=n * entry_bytes + sliding_dense,
        kv_bytes=(real * entry_bytes // slots if real is not None else entries * entry_bytes) + sliding,
        kv_bytes_stored=side.stored_bytes if side is not None else 0, kv_entries_sliding=sliding_entries,
        kv_bytes_sliding=sliding, compressed=planned.drops_tokens or (planned.drops_entries and side is not None),
        lookahead_tokens=prepared.draft.lengths[row] if prepared.draft is not None else 0,
        accepted_guess_tokens=len(accepted.token_ids) - 1 if (accepted := prepared.accepted[row]) is not None else 0,
        guess_rounds=accepted.rounds if accepted is not None else 0,
        full_cache_tokens=len(accepted.token_ids) if accepted is not None else 0,
        new_tokens=new_tokens, time_to_first_token=first_token_at - prepared.started,
        total_time=finished - prepared.started, timings=dict(prepared.clock.stages), peak_memory_bytes=memory,
        note="; ".join([*planned.notes(prepared.consumer.target.full), *notes, *shared,
                        *filter(None, [prepared.consumer.speculation_note])]),
    )
    return stats, kept_tokens, kept_kv
