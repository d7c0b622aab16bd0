"""Both stations' selections over a batch: station 1 keeps prompt tokens per row, station 2 keeps KV
entries per row, layer and KV head. Methods choose positions in their row's own coordinates; here
they become the batch's padded columns, a row mask, or a ragged cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ..engine.cache import compressed_layers, gather_positions, gathered_copy, ragged_cache
from ..methods import Method, SpecKV
from ..prompt import EncodedPrompt, encode_prompt, kept_text, user_turn
from ..types import Request
from .batch import DraftView, PaddedBatch, pad_prompts

if TYPE_CHECKING:
    from .plan import RowPlan


@dataclass
class KeptPrompt:
    """What station 1 hands on: the batch the target reads, and what was kept of each row."""

    batch: PaddedBatch
    kept_tokens: list[torch.Tensor | None]  # per row, the prompt positions kept (None: all)
    # Per row, when the draft has another tokenizer: the kept text of the user's content and its
    # character spans (the target re-tokenised that text, so kept_tokens is None there).
    kept_texts: list[tuple[str, list[tuple[int, int]]] | None]


def keep_prompt(method: Method, requests: list[Request], prompts: list[EncodedPrompt],
                draft_prompts: list[EncodedPrompt], rows_planned: list[RowPlan], draft: DraftView | None, tokenizer,
                pad_id: int, cross: bool, device: torch.device) -> KeptPrompt:
    """Station 1 for every row that it compresses. Across tokenizers (`cross`: the draft's prompts are in
    its own tokens) the kept text crosses back and the target re-tokenises it."""
    original = method.keeps_original_positions and not cross
    kept_tokens: list[torch.Tensor | None] = [None] * len(requests)
    kept_texts: list[tuple[str, list[tuple[int, int]]] | None] = [None] * len(requests)
    rows, positions, next_positions = [], [], []
    for row, prompt in enumerate(prompts):
        ids = prompt.ids
        if rows_planned[row].drops_tokens:
            source = draft_prompts[row]
            scores = None
            if draft is not None and draft.token_scores is not None:
                scores = draft.token_scores[row, len(draft.token_scores[row]) - len(source.ids):]
            # Across tokenizers the budget is scaled to the draft's tokens; the result is close to it.
            planned = rows_planned[row].prompt_budget
            budget = planned if not cross else round(planned * len(source.ids) / len(ids))
            kept = method.keep_tokens(source.ids, source.question_start, budget, scores)
            if cross:
                kept_texts[row] = kept_text(source, kept.tolist())
                messages, _ = user_turn(requests[row])
                retold = Request(messages=[*messages[:-1], {**messages[-1], "content": kept_texts[row][0]}],
                                 chat_template=requests[row].chat_template)
                ids = encode_prompt(tokenizer, retold).ids
            else:
                kept_tokens[row] = kept
                ids = [ids[p] for p in kept.tolist()]
        rows.append(ids)
        kept_positions = kept_tokens[row].tolist() if kept_tokens[row] is not None else None
        positions.append(kept_positions if original and kept_positions else list(range(len(ids))))
        next_positions.append(len(prompt.ids) if original and kept_positions else len(ids))
    return KeptPrompt(pad_prompts(rows, pad_id, device, positions, next_positions), kept_tokens, kept_texts)


def select_kv(method: Method, scores: list[torch.Tensor], batch: PaddedBatch, rows_planned: list[RowPlan],
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor] | None]]:
    """Station 2 for every row. Returns, per layer, the gather index [B, H_kv, K_l] into the padded
    cache and which of those slots hold a real entry [B, H_kv, K_l], and each row's kept positions
    (row coordinates, -1 for empty slots; None for rows kept whole).

    scores: per layer [B, H_kv, S], the scorer's scores of the first S columns (zeros for a method that
    scores nothing)."""
    kept_rows: list[list[torch.Tensor] | None] = []
    for row, planned in enumerate(rows_planned):
        if not planned.drops_entries:
            kept_rows.append(None)
            continue
        pad = batch.pad(row)
        kept_rows.append(method.keep_positions([s[row, :, pad:].float() for s in scores], batch.lengths[row],
                                               planned.kv_budget))
    num_kv_heads = scores[0].shape[1]
    index, valid = [], []
    for layer in range(len(scores)):
        rows = [kept[layer] + batch.pad(row) if kept is not None else
                torch.arange(batch.pad(row), batch.width).expand(num_kv_heads, -1)
                for row, kept in enumerate(kept_rows)]
        width = max(r.shape[-1] for r in rows)
        layer_index = torch.zeros(len(rows), num_kv_heads, width, dtype=torch.long)
        layer_valid = torch.zeros(len(rows), num_kv_heads, width, dtype=torch.bool)
        for row, (columns, kept) in enumerate(zip(rows, kept_rows, strict=True)):
            real = kept[layer] >= 0 if kept is not None else torch.ones_like(columns, dtype=torch.bool)
            layer_index[row, :, width - columns.shape[-1]:] = columns.clamp(min=0)
            layer_valid[row, :, width - columns.shape[-1]:] = real
        index.append(layer_index)
        valid.append(layer_valid)
    return index, valid, kept_rows


def row_mask(valid: list[torch.Tensor]) -> tuple[bool, torch.Tensor | None]:
    """Whether the kept slots form one 2-D mask (same in every layer and head); and that mask
    ([B, K], None when all real). Otherwise the cache must be ragged."""
    first = valid[0][:, 0]
    uniform = all(v.shape == valid[0].shape and torch.equal(v, first[:, None].expand_as(v)) for v in valid)
    if not uniform:
        return False, None
    return True, None if bool(first.all()) else first.long()


def kv_stage(method: Method, cache: DynamicCache, batch: PaddedBatch, scores: list[torch.Tensor] | None,
             rows_planned: list[RowPlan], *, copy: bool) -> tuple[DynamicCache, torch.Tensor | None,
                                                                 list[list[torch.Tensor] | None]]:
    """Station 2: keep each compressed layer's and head's entries (full-attention layers: a sliding
    window keeps its window); in place, or into a new cache when `copy` (so several methods can start
    from one prefill). Returns the cache, its row mask, the kept rows.

    scores: per compressed layer [B, H_kv, S] (see cache.compressed_layers)."""
    layers = compressed_layers(cache)
    if scores is None:  # the method decides by position alone
        keys = cache.layers[layers[0]].keys
        scores = [torch.zeros(keys.shape[0], keys.shape[1], batch.width, device=keys.device)] * len(layers)
    if len(scores) != len(layers):
        raise RuntimeError(f"scores for {len(scores)} layers, but the cache compresses {len(layers)}")
    index, valid, kept_rows = select_kv(method, scores, batch, rows_planned)
    uniform, attention_mask = row_mask(valid)
    if not uniform:  # layers or heads keep different numbers of entries: a ragged cache, masked per head
        cache = ragged_cache(cache, index, valid, method.cache_layout)
    elif copy:
        cache = gathered_copy(cache, index)
    else:
        gather_positions(cache, index)
    if attention_mask is not None:
        attention_mask = attention_mask.to(batch.input_ids.device)
    return cache, attention_mask, kept_rows


DRAFT_WINDOW = 32  # the draft's own window queries, which score its cache for speculation


def keep_of_draft(cache: DynamicCache, scores: list[torch.Tensor] | None, width: int, read: int,
                  budget: int | None, how: str) -> None:
    """Cut the draft's cache for speculation to `budget` of its `width` prompt entries, as `how` says:
    "compressed" keeps what the draft's own window and lookahead attend to most (SpecKV applied to the
    draft; `scores`: theirs, per layer), "window" the first and the last entries, "whole" everything;
    the `read` answer tokens after the prompt always stay. `budget`: the plan's (RowPlan.draft_budget;
    None keeps everything)."""
    if how == "whole" or budget is None:
        return
    window = min(DRAFT_WINDOW, budget // 2)
    if how == "window":
        sink = min(4, budget - window)
        chosen = [torch.cat([torch.arange(sink), torch.arange(width - (budget - sink), width)])
                  .expand(layer.keys.shape[1], -1) for layer in cache.layers]
    else:
        chosen = SpecKV(budget=budget, window=window).keep_positions([layer[0].float() for layer in scores], width,
                                                                     budget)
    after = torch.arange(width, width + read)
    gather_positions(cache, [torch.cat([positions, after.expand(positions.shape[0], -1)], dim=-1)[None]
                             for positions in chosen])
