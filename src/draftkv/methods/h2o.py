"""H2O (heavy hitters): keep the keys that received the most attention from all prompt queries.

Each key's score is the attention it received, accumulated over every prompt query and the query
heads of its group (a mean here, which ranks like the sum). The column sums are computed in chunks
of queries, so memory stays O(chunk * n), never O(n^2). The last `window` tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import WindowKVMethod, param


@dataclass(frozen=True)
class H2O(WindowKVMethod):
    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "KV dropping by the attention each key received from all prompt queries (heavy hitters)."
    all_queries: ClassVar[bool] = True

    kernel: int = param(1, "odd pooling kernel along keys (1 = none, as in H2O)")
    reduction: str = param("mean", "over query heads and all prompt queries: mean (ranks like H2O's sums) or max")
