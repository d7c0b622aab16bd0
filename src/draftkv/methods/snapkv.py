"""SnapKV: the last `window` prompt queries score the prefix; keep the top entries per head.

It is SpecKV with no lookahead. Defaults follow the SnapKV LongBench configs (window 32,
max pooling with kernel 7); kvpress uses mean reduction and avg pooling, both selectable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import WindowKVMethod, param


@dataclass(frozen=True)
class SnapKV(WindowKVMethod):
    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = "KV dropping by the attention of the last prompt tokens (window queries)."


@dataclass(frozen=True)
class AdaSnapKV(SnapKV):
    name: ClassVar[str] = "ada-snapkv"
    summary: ClassVar[str] = "SnapKV with Ada-KV's adaptive per-head budgets (ragged cache)."

    allocation: str = param("ada", "how the budget is spread over layers and KV heads (Ada-KV's: ada)")
