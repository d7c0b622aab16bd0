"""Truncation baselines: keep the end of the prompt, or both ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from .base import PromptMethod, check_int, param

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class KeepLast(PromptMethod):
    name: ClassVar[str] = "keep-last"
    summary: ClassVar[str] = "Truncation: keep the last `budget` prompt tokens."

    window: int = param(0, "unused: the kept tokens are the last ones anyway")

    def keep_tokens(self, prompt_ids: list[int], question_start: int, budget: int,
                    scores: torch.Tensor | None) -> torch.Tensor:
        import torch

        n = len(prompt_ids)
        return torch.arange(n - budget, n)


@dataclass(frozen=True)
class KeepEnds(PromptMethod):
    name: ClassVar[str] = "keep-ends"
    summary: ClassVar[str] = "Truncation: keep the first `head` and the last `budget - head` prompt tokens."

    window: int = param(0, "unused: the tail is kept anyway")
    head: int | None = param(None, "first tokens kept; None = half the budget")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.head is not None:
            check_int("head", self.head, 0)
            if isinstance(self.budget, int) and self.head > self.budget:
                raise ConfigError(f"head ({self.head}) must not be larger than the budget ({self.budget})")

    def keep_tokens(self, prompt_ids: list[int], question_start: int, budget: int,
                    scores: torch.Tensor | None) -> torch.Tensor:
        import torch

        n = len(prompt_ids)
        head = min(budget // 2 if self.head is None else self.head, budget)
        return torch.cat([torch.arange(head), torch.arange(n - (budget - head), n)])
