"""SpecKV-PC: the cascade. One draft pass gives both the prompt scores and the lookahead answer.

The prompt is compressed with SpecPC to `prompt_budget` tokens (paper: 2048, kernel and
neighbourhood 32, draft layers from 8 of 24: a third of the draft's depth), then the target's KV cache is compressed with SpecKV to `budget`
entries per layer and head, using the same draft tokens as its lookahead probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from .base import Budget, check_budget, param
from .scorers import DraftAttention
from .speckv import SpecKV
from .specpc import SpecPC

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class SpecKVPC(SpecKV):
    name: ClassVar[str] = "speckv-pc"
    summary: ClassVar[str] = "SpecPC then SpecKV from one draft pass: fewer prompt tokens, then fewer KV entries."

    prompt_budget: Budget = param(2048, "prompt tokens kept by the SpecPC stage (int) or a ratio in (0, 1]")
    prompt_window: int = param(64, "SpecPC window: last prompt tokens always kept")
    prompt_kernel: int = param(31, "SpecPC odd pooling kernel (paper: 32)")
    neighbourhood: int = param(32, "SpecPC neighbourhood around each selected position")
    start_layer: int | None = param(None, "first draft layer whose attention counts for SpecPC; None = a third "
                                          "of the draft's layers (the paper's 8 of 24)")
    positions: str = param("renumbered", "positions of kept prompt tokens: renumbered or original")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_budget(self.prompt_budget, "prompt_budget")
        _ = self.prompt_stage  # builds, and so validates, the SpecPC stage now rather than at the first request
        if isinstance(self.budget, int) and isinstance(self.prompt_budget, int) \
                and self.budget > self.prompt_budget:
            raise ConfigError(f"the KV budget ({self.budget}) must not exceed the prompt budget "
                              f"({self.prompt_budget}): the KV stage runs on the compressed prompt")

    @property
    def compresses_prompt(self) -> bool:
        return self.prompt_stage.compresses_prompt

    @property
    def keeps_original_positions(self) -> bool:
        return self.prompt_stage.keeps_original_positions

    @property
    def prompt_stage(self) -> SpecPC:
        return SpecPC(budget=self.prompt_budget, window=self.prompt_window, lookahead=1,
                      start_layer=self.start_layer, kernel=self.prompt_kernel, neighbourhood=self.neighbourhood,
                      positions=self.positions)

    def prompt_tokens(self, prompt_length: int) -> int | None:
        return self.prompt_stage.prompt_tokens(prompt_length)

    def draft_scorer(self) -> DraftAttention:
        return self.prompt_stage.draft_scorer()

    def keep_tokens(self, prompt_ids: list[int], question_start: int, budget: int,
                    scores: torch.Tensor | None) -> torch.Tensor:
        return self.prompt_stage.keep_tokens(prompt_ids, question_start, budget, scores)
