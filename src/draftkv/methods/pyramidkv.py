"""PyramidKV: SnapKV's scores, with budgets that shrink linearly with depth.

With `beta` (20), the entries chosen by score per layer go from `max = 2 (C - W) - min` in the first
layer down to `min = (C - W) / beta` in the last; their mean stays `C - W`, so the whole cache holds
what SnapKV's would. The window is kept in every layer on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .base import param
from .snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "SnapKV with per-layer budgets decreasing linearly with depth (same total)."

    beta: float = param(20, "ratio of the first layer's share to the last layer's is about 2 * beta - 1")

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or self.beta < 1:
            raise ConfigError(f"beta must be a number >= 1, got {self.beta!r}")

    def layer_budgets(self, num_layers: int, prefix_length: int, budget: int) -> list[int]:
        base = budget - self.window
        low = base / self.beta
        high = 2 * base - low
        steps = max(num_layers - 1, 1)
        exact = [high - (high - low) * layer / steps for layer in range(num_layers)] if num_layers > 1 else [base]
        # Round so the layers still sum to num_layers * base (largest remainders get the extra entry).
        counts = [int(x) for x in exact]
        for layer in sorted(range(num_layers), key=lambda i: exact[i] - counts[i], reverse=True)[
                : num_layers * base - sum(counts)]:
            counts[layer] += 1
        return [min(count, prefix_length) for count in counts]
