"""Ada (Ada-KV): within each layer the KV heads share the layer's entries by score, each keeping at
least `alpha` of a uniform share of its own best; every layer keeps what a uniform split would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import Allocation, top_of_pool, top_per_head

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Ada(Allocation):
    name: ClassVar[str] = "ada"
    summary: ClassVar[str] = "the KV heads of a layer share its entries by score (Ada-KV), each above a floor"

    alpha: float = 0.2

    def select(self, pooled: list[torch.Tensor], chosen: int) -> list[torch.Tensor]:
        floor = int(self.alpha * chosen)
        masks = []
        for scores in pooled:
            heads = scores.shape[0]
            floors = top_per_head(scores, floor)
            masks.append(top_of_pool(scores, heads * (chosen - floor), floors))
        return masks
