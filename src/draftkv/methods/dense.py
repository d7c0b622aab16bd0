"""Dense: no compression. The reference for accuracy and cost."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method


@dataclass(frozen=True)
class Dense(Method):
    pass
