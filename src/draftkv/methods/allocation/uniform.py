"""Uniform: every layer and KV head keeps the same number of entries, its own best (SnapKV, SpecKV,
H2O, LAQ++, KeyDiff)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import Allocation, top_per_head

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Uniform(Allocation):
    name: ClassVar[str] = "uniform"
    summary: ClassVar[str] = "every layer and KV head keeps the same number of entries"

    def select(self, pooled: list[torch.Tensor], chosen: int) -> list[torch.Tensor]:
        return [top_per_head(scores, chosen) for scores in pooled]
