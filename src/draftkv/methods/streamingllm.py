"""StreamingLLM: keep the first `sink` tokens (attention sinks) and the most recent ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from .base import KVMethod, check_int, param

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class StreamingLLM(KVMethod):
    name: ClassVar[str] = "streamingllm"
    summary: ClassVar[str] = "KV dropping by position: the first `sink` tokens and the last `budget - sink`."

    sink: int = param(4, "first prompt tokens always kept (attention sinks)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink", self.sink, 0)
        if isinstance(self.budget, int) and self.sink >= self.budget:
            raise ConfigError(f"sink ({self.sink}) must be smaller than the budget ({self.budget})")

    def keep_positions(self, layer_scores: list[torch.Tensor], prompt_length: int, budget: int) -> list[torch.Tensor]:
        import torch

        sink = min(self.sink, budget)
        kept = torch.cat([torch.arange(sink), torch.arange(prompt_length - (budget - sink), prompt_length)])
        return [kept.expand(scores.shape[0], -1) for scores in layer_scores]
