"""A batch of prompts as the models read it: left-padded rows with their own positions, and the
draft's guesses of the answer per row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import DynamicCache

    from .steps import Redraft


@dataclass
class PaddedBatch:
    """Prompts left-padded to one length N; row b's prompt occupies columns pad(b)..N-1."""

    input_ids: torch.Tensor  # [B, N]
    attention_mask: torch.Tensor | None  # [B, N]; None when no row is padded
    position_ids: torch.Tensor  # [B, N]
    lengths: list[int]  # tokens per row
    next_positions: list[int]  # position of the first generated token per row

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def pad(self, row: int) -> int:
        return self.width - self.lengths[row]


@dataclass
class DraftView:
    """What the draft pass hands on: its guess of the answer and its prompt-token scores, per row."""

    lookahead_ids: torch.Tensor  # [B, L] (padded after a row's own end)
    lookahead_valid: torch.Tensor  # [B, L] bool
    lengths: list[int]
    token_scores: torch.Tensor | None = None  # [B, N] per prompt column, for the prompt stage
    kept: DraftCache | None = None  # the draft's cache, kept for a consumer that speculates (one request)
    again: Redraft | None = None  # the draft after its prefill, for a consumer that guesses again


@dataclass
class DraftCache:
    """The draft's cache after its pass over one request: the prompt (as the draft read it) and the first
    `read` lookahead tokens; `position`: where its first answer token goes."""

    cache: DynamicCache
    position: int
    read: int
    scores: list[torch.Tensor] | None = None  # per full layer [1, H_kv, N]: the draft's own window and lookahead


def pad_prompts(rows: list[list[int]], pad_id: int, device: torch.device,
                positions: list[list[int]] | None = None, next_positions: list[int] | None = None) -> PaddedBatch:
    """Left-pad token rows; positions default to 0..len-1 (kept tokens may keep their original ones)."""
    lengths = [len(ids) for ids in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
        row_positions = positions[row] if positions is not None else range(len(tokens))
        position_ids[row, width - len(tokens):] = torch.tensor(list(row_positions), dtype=torch.long)
    padded = min(lengths) < width
    return PaddedBatch(ids.to(device), mask.to(device) if padded else None, position_ids.to(device), lengths,
                       next_positions or lengths)


def left_padded(rows: list[torch.Tensor], dim: int) -> torch.Tensor:
    """One-row tensors [1, ..., n_b, ...] stacked into [B, ..., max n_b, ...], zeros before each row's own."""
    width = max(row.shape[dim] for row in rows)
    shape = list(rows[0].shape)
    shape[0], shape[dim] = len(rows), width
    stacked = rows[0].new_zeros(shape)
    for index, row in enumerate(rows):
        stacked[index: index + 1].narrow(dim, width - row.shape[dim], row.shape[dim]).copy_(row)
    return stacked


def lookahead_view(token_ids: list[list[int]], pad_id: int, device: torch.device) -> DraftView:
    """Guessed answers of different lengths as one padded [B, L] block with a validity mask."""
    lengths = [len(ids) for ids in token_ids]
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    valid = torch.zeros((len(lengths), max(lengths)), dtype=torch.bool)
    for row, row_ids in enumerate(token_ids):
        ids[row, : lengths[row]] = torch.tensor(row_ids, dtype=torch.long)
        valid[row, : lengths[row]] = True
    return DraftView(ids.to(device), valid.to(device), lengths)


def pad_token(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
