"""LLMLingua-style compression: keep the prompt tokens the draft finds most surprising.

The draft scores each prompt token by its self-information -log p(token | prefix); the question and
the last `window` tokens are always kept, and the rest of the budget goes to the most informative
context tokens. (LLMLingua-2 needs a trained token classifier that cannot be downloaded here; this is
the original self-information idea and needs only the draft.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import PromptError
from .base import PromptMethod, first_in_order, param
from .scorers import SelfInformation

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Lingua(PromptMethod):
    name: ClassVar[str] = "lingua"
    summary: ClassVar[str] = "Prompt compression by the draft's self-information; question and tail always kept."

    window: int = param(32, "last prompt tokens always kept (besides the question)")

    def draft_scorer(self) -> SelfInformation:
        return SelfInformation()

    def keep_tokens(self, prompt_ids: list[int], question_start: int, budget: int,
                    scores: torch.Tensor | None) -> torch.Tensor:
        import torch

        assert scores is not None
        n = len(prompt_ids)
        always = torch.cat([torch.arange(min(question_start, n - self.window), n)])
        if always.numel() > budget:
            raise PromptError(
                f"the question and the last {self.window} tokens take {always.numel()} tokens, more than the budget of "
                f"{budget}; give a larger budget"
            )
        ranked = torch.sort(scores.float().cpu(), descending=True, stable=True).indices
        return first_in_order(torch.cat([always, ranked]), budget)
