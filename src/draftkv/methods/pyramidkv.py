"""PyramidKV: SnapKV's scores, with the pyramid allocation: the entries kept per layer shrink linearly
with depth (`beta` sets how steeply, see allocation/pyramid.py), the same total as SnapKV's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import param
from .snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    name: ClassVar[str] = "pyramidkv"
    summary: ClassVar[str] = "SnapKV with per-layer budgets decreasing linearly with depth (same total)."

    allocation: str = param("pyramid", "how the budget is spread over layers and KV heads (PyramidKV's: pyramid)")
