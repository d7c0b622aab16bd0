"""SpecPrefill: draft-based prompt compression that predates SpecPC.

The draft scores prompt tokens by the attention of the last prompt token and of `lookahead`
generated tokens: max over layers and heads, mean over the lookahead steps, optionally smoothed by
average pooling (kernel 13). Keep the top tokens (or the top `chunk`-token chunks), sorted, at
their original positions. It is SpecPC with a window of one and no neighbourhood expansion.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import PromptMethod, check_choice, check_int, check_kernel, first_in_order, param
from .scorers import DraftAttention

if TYPE_CHECKING:
    import torch



@dataclass(frozen=True)
class SpecPrefill(PromptMethod):
    name: ClassVar[str] = "specprefill"
    summary: ClassVar[str] = "Prompt compression by the draft's last-token and lookahead attention (top tokens or chunks)."

    window: int = param(1, "last prompt tokens always kept (their queries score the prompt)")
    positions: str = param("original", "positions of kept tokens: original (SpecPrefill) or renumbered")
    lookahead: int = param(8, "draft lookahead tokens (the paper tries 1, 4 and 8)")
    kernel: int = param(13, "odd average-pooling kernel over token scores (1 = none)")
    pooling: str = param("avg", "avg or max")
    chunk: int = param(0, "keep whole chunks of this many tokens, ranked by mean score (0 = single tokens)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("lookahead", self.lookahead, 0)
        check_int("chunk", self.chunk, 0)
        check_kernel(self.kernel)
        check_choice("pooling", self.pooling, ("max", "avg"))

    def draft_lookahead(self, max_new_tokens: int) -> int:
        return self.lookahead

    def draft_scorer(self) -> DraftAttention:
        return DraftAttention(window=max(self.window, 1), step_reduction="mean")

    def keep_tokens(self, prompt_ids: list[int], question_start: int, budget: int,
                    scores: torch.Tensor | None) -> torch.Tensor:
        import torch

        from ..engine.scoring import pool_scores

        assert scores is not None
        n = len(prompt_ids)
        smoothed = pool_scores(scores.float().cpu(), min(self.kernel, n if n % 2 else n - 1), self.pooling)
        if self.chunk:
            starts = torch.arange(0, n, self.chunk)
            chunk_means = torch.stack([smoothed[s: s + self.chunk].mean() for s in starts.tolist()])
            ranked_chunks = torch.sort(chunk_means, descending=True, stable=True).indices
            ranked = torch.cat([torch.arange(starts[c], min(starts[c] + self.chunk, n)) for c in ranked_chunks.tolist()])
        else:
            ranked = torch.sort(smoothed, descending=True, stable=True).indices
        return first_in_order(torch.cat([torch.arange(n - self.window, n), ranked]), budget)
