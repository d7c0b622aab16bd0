"""SpecPC: the draft's attention tells which prompt tokens the target needs; drop the rest.

1. The draft reads the prompt and generates `lookahead` tokens (default 1). For every draft layer
   from `start_layer` on (by default a third of the draft's depth: the paper's 8 of 24, so that a
   draft of any depth works), the last `window` prompt queries (weighted linearly from 0 for the oldest
   to 1 for the newest) and each lookahead token score every prompt token.
2. Reduce to one score per token: over heads and queries, then layers, then steps (max by default).
3. Smooth with a `kernel`-wide pool, zero-padded so the length stays n.
4. Rank positions by smoothed score; expand each to its `neighbourhood` nearest tokens (nearest
   first); always keep the window (and optionally `sink` first tokens); de-duplicate in rank order;
   cut to exactly `budget` tokens; sort.
5. The target sees only the kept tokens, renumbered 0..C-1 (the paper) or at their original positions.

The paper's kernel is 64 for Qwen (32 for Llama); kernels here must be odd so the smoothed scores
keep their length, so the default is 63 with a neighbourhood of 64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError, PromptError
from .allocation import best_positions
from .base import (
    PromptMethod,
    check_bool,
    check_choice,
    check_int,
    check_kernel,
    first_in_order,
    param,
)
from .scorers import DraftAttention

if TYPE_CHECKING:
    import torch



def nearest_first_offsets(size: int) -> torch.Tensor:
    """0, -1, +1, -2, +2, ...: the `size` offsets of a neighbourhood, nearest first."""
    import torch

    steps = torch.arange(1, size)
    return torch.cat([torch.zeros(1, dtype=torch.long), ((steps + 1) // 2) * torch.where(steps % 2 == 1, -1, 1)])


def select_with_neighbourhoods(scores: torch.Tensor, budget: int, *, window: int, kernel: int, pooling: str,
                               neighbourhood: int, sink: int = 0) -> torch.Tensor:
    """SpecPC's selection over one prompt's token scores [n]: exactly `budget` sorted positions."""
    import torch

    from ..engine.scoring import pool_scores

    n = scores.shape[0]
    if kernel > n or neighbourhood > n:
        raise PromptError(
            f"the pooling kernel ({kernel}) and the neighbourhood ({neighbourhood}) must not be larger than the "
            f"prompt ({n} tokens); give smaller ones"
        )
    smoothed = pool_scores(scores.float().cpu(), kernel, pooling)
    # Only the best `budget` positions can be needed: each adds at least one new token.
    ranked = best_positions(smoothed, budget)
    expanded = (ranked[:, None] + nearest_first_offsets(neighbourhood)[None, :]).flatten()
    expanded = expanded[(expanded >= 0) & (expanded < n)]
    always = torch.cat([torch.arange(n - window, n), torch.arange(min(sink, n))])
    return first_in_order(torch.cat([always, expanded]), budget)


@dataclass(frozen=True)
class SpecPC(PromptMethod):
    name: ClassVar[str] = "specpc"
    summary: ClassVar[str] = "Prompt compression by the draft's attention (window queries + lookahead)."

    lookahead: int = param(1, "draft lookahead tokens whose attention also scores the prompt")
    start_layer: int | None = param(None, "first draft layer whose attention counts; None = a third of the "
                                          "draft's layers (the paper's 8 of 24)")
    weighted: bool = param(True, "weight window queries linearly from 0 (oldest) to 1 (newest)")
    head_reduction: str = param("max", "over heads and queries: max or mean")
    layer_reduction: str = param("max", "over layers: max or mean")
    step_reduction: str = param("max", "over the window and each lookahead token: max or mean")
    kernel: int = param(63, "odd pooling kernel smoothing the token scores")
    pooling: str = param("max", "max or avg")
    neighbourhood: int = param(64, "tokens kept around each selected position, nearest first")
    sink: int = param(0, "first prompt tokens always kept (not in the paper)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("lookahead", self.lookahead, 0)
        if self.start_layer is not None:
            check_int("start_layer", self.start_layer, 0)
        check_int("neighbourhood", self.neighbourhood, 1)
        check_int("sink", self.sink, 0)
        check_kernel(self.kernel)
        check_bool("weighted", self.weighted)
        for name in ("head_reduction", "layer_reduction", "step_reduction"):
            check_choice(name, getattr(self, name), ("max", "mean"))
        check_choice("pooling", self.pooling, ("max", "avg"))
        if isinstance(self.budget, int) and self.window + self.sink >= self.budget:
            raise ConfigError(f"window + sink ({self.window + self.sink}) must be smaller than the budget ({self.budget})")

    def draft_lookahead(self, max_new_tokens: int) -> int:
        return self.lookahead

    def draft_scorer(self) -> DraftAttention:
        return DraftAttention(self.window, self.start_layer, self.weighted, self.head_reduction,
                            self.layer_reduction, self.step_reduction)

    def keep_tokens(self, prompt_ids: list[int], question_start: int, budget: int,
                    scores: torch.Tensor | None) -> torch.Tensor:
        assert scores is not None
        return select_with_neighbourhoods(scores, budget, window=self.window, kernel=self.kernel,
                                          pooling=self.pooling, neighbourhood=self.neighbourhood, sink=self.sink)
