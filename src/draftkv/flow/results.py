"""The finish step: decode each consumer's prepared batch and build the only `Stats`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ..attention import capture, ragged_attention
from ..decoding import TextCallback, decode
from ..eviction import DecodeEviction
from ..methods import Method
from ..prompt import EncodedPrompt
from ..types import Request, Result, Stats
from .batch import DraftView, PaddedBatch
from .select import KeptPrompt
from .steps import Clock, eos_ids, peak_memory

if TYPE_CHECKING:
    from ..models import ModelPair


@dataclass
class Prepared:
    """One consumer's batch after both stations: the (compressed) target cache, ready to decode."""

    method: Method
    requests: list[Request]
    prompts: list[EncodedPrompt]  # the full prompts, as the target's tokenizer encodes them
    kept: KeptPrompt  # what station 1 kept, and the batch the target read
    kv_budgets: list[int | None]
    draft: DraftView | None  # this consumer's view of the draft pass
    clock: Clock  # this consumer's stages: its own and those it shared
    started: float
    cache: DynamicCache | None = None  # None: the target was not run (prompt compression alone)
    first_logits: torch.Tensor | None = None  # [B, V], the last prompt position's logits
    attention_mask: torch.Tensor | None = None  # [B, physical cache length]; None when no row is padded
    kept_rows: list[list[torch.Tensor] | None] | None = None  # per row, per layer [H_kv, kept] station-1 positions
    layer_scores: list[torch.Tensor] | None = None  # per layer [B, H_kv, N - window] window importance
    entry_bytes: int = 0  # one position's keys and values over the compressed (full-attention) layers
    sliding_windows: list[tuple[int, int]] | None = None  # per sliding-window layer: its window, bytes per entry
    stored_bytes: int = 0  # what the batch's cache tensors hold right after compression, padding included
    shared_prefill: bool = False  # the target prefill served other consumers too
    guess: DraftView | None = None  # the guessed answer that probed the cache: the draft's, or the target's own

    @property
    def batch(self) -> PaddedBatch:
        return self.kept.batch

    @property
    def budgets(self) -> list[int | None]:
        return self.kv_budgets


def finish(pair: ModelPair, prepared: Prepared, on_text: TextCallback | None = None,
           cancelled: Callable[[int], bool] | None = None) -> list[Result]:
    """Decode a prepared batch (with decode-time eviction when the method asks) and build the results."""
    method, requests = prepared.method, prepared.requests
    target, clock = pair.target.model, prepared.clock
    eviction = None
    if method.evicts_during_decode and prepared.kept_rows[0] is not None:
        eviction = DecodeEviction(method, prepared.kv_budgets[0])
    decoding = clock.start("decode")
    with ragged_attention(target, prepared.cache), capture(target, eviction):
        output = decode(
            target, prepared.cache, prepared.first_logits,
            positions=torch.tensor(prepared.batch.next_positions, device=target.device),
            attention_mask=prepared.attention_mask, max_new_tokens=[r.max_new_tokens for r in requests],
            samplings=[r.sampling for r in requests],
            eos_token_ids=[set() if r.ignore_eos else eos_ids(target, pair.tokenizer) for r in requests],
            tokenizer=pair.tokenizer, stops=[r.stop for r in requests], on_text=on_text,
            after_step=eviction.after_step if eviction is not None else None, cancelled=cancelled,
        )
    finished = clock.now()
    clock.add("decode", finished - max(decoding, output.first_token_at))
    memory = peak_memory(target.device)
    results = []
    for row, decoded in enumerate(output.rows):
        stats, kept_tokens, kept_kv = row_stats(prepared, row, len(decoded.token_ids), output.first_token_at,
                                                finished, memory)
        notes = [stats.note]
        if eviction is not None:
            notes.append(f"decode-time eviction ran {eviction.evictions} times")
        if prepared.shared_prefill:
            notes.append("shared prefill")
        stats.note = "; ".join(filter(None, notes))
        results.append(Result(decoded.text, decoded.token_ids, decoded.finish_reason, stats, kept_kv, kept_tokens))
    return results


def row_stats(prepared: Prepared, row: int, new_tokens: int, first_token_at: float, finished: float,
              memory: int | None) -> tuple[Stats, torch.Tensor | None, list[torch.Tensor] | None]:
    """One row's stats, its station-1 kept tokens and its kept KV positions (in original prompt positions)."""
    n = len(prepared.prompts[row].ids)
    kept_tokens, kept_kv = prepared.kept.kept_tokens[row], prepared.kept_rows[row]
    stage_length = prepared.batch.lengths[row]
    if kept_kv is not None and kept_tokens is not None:
        kept_kv = [torch.where(positions >= 0, kept_tokens[positions.clamp(min=0)], -1) for positions in kept_kv]
    # Entries per layer and head: exact for uniform budgets, the mean for PyramidKV and Ada-KV.
    real = sum(int((positions >= 0).sum()) for positions in kept_kv) if kept_kv is not None else None
    slots = sum(positions.numel() // positions.shape[-1] for positions in kept_kv) if kept_kv is not None else 1
    entries = round(real / slots) if real is not None else stage_length
    budget = prepared.kv_budgets[row]
    prompt_budget = prepared.method.prompt_tokens(n)
    windows = prepared.sliding_windows or []
    sliding_entries = max((min(stage_length, window - 1) for window, _ in windows), default=0)
    sliding = sum(min(stage_length, window - 1) * entry for window, entry in windows)
    sliding_dense = sum(min(n, window - 1) * entry for window, entry in windows)
    notes = []
    if prompt_budget is not None and kept_tokens is None:
        notes.append(f"prompt budget {prompt_budget} >= prompt length {n}: the whole prompt was kept")
    if budget is not None and kept_kv is None and prepared.entry_bytes == 0:
        notes.append("every layer is a sliding window, which keeps its window: no KV budget applies")
    elif budget is not None and kept_kv is None:
        notes.append(f"budget {budget} >= prompt length {stage_length}: ran dense")
    stats = Stats(
        method=prepared.method.name, prompt_tokens=n, kept_prompt_tokens=stage_length, kv_entries=entries,
        kv_bytes_dense=n * prepared.entry_bytes + sliding_dense,
        kv_bytes=(real * prepared.entry_bytes // slots if real is not None else entries * prepared.entry_bytes) + sliding,
        kv_bytes_stored=prepared.stored_bytes, kv_entries_sliding=sliding_entries, kv_bytes_sliding=sliding,
        compressed=kept_tokens is not None or kept_kv is not None or prepared.kept.kept_texts[row] is not None,
        lookahead_tokens=prepared.draft.lengths[row] if prepared.draft is not None else 0,
        new_tokens=new_tokens, time_to_first_token=first_token_at - prepared.started,
        total_time=finished - prepared.started, timings=dict(prepared.clock.stages), peak_memory_bytes=memory,
        note="; ".join(notes),
    )
    return stats, kept_tokens, kept_kv
