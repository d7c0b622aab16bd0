"""Pyramid (PyramidKV): the number kept per layer shrinks linearly with depth, the same in each KV head
of a layer. With `beta` (20) it goes from `2 C - C / beta` in the first layer to `C / beta` in the last,
where C is the mean per layer, so the whole cache holds what a uniform one would."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import Allocation, top_per_head

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Pyramid(Allocation):
    name: ClassVar[str] = "pyramid"
    summary: ClassVar[str] = "per-layer shares shrinking linearly with depth (PyramidKV), the same total"

    beta: float = 20

    def layer_counts(self, num_layers: int, chosen: int) -> list[int]:
        low = chosen / self.beta
        high = 2 * chosen - low
        steps = max(num_layers - 1, 1)
        exact = [high - (high - low) * layer / steps for layer in range(num_layers)] if num_layers > 1 else [chosen]
        # Round so the layers still sum to num_layers * chosen (largest remainders get the extra entry).
        counts = [int(x) for x in exact]
        for layer in sorted(range(num_layers), key=lambda i: exact[i] - counts[i], reverse=True)[
                : num_layers * chosen - sum(counts)]:
            counts[layer] += 1
        return counts

    def select(self, pooled: list[torch.Tensor], chosen: int) -> list[torch.Tensor]:
        counts = self.layer_counts(len(pooled), chosen)
        return [top_per_head(scores, count) for scores, count in zip(pooled, counts, strict=True)]
