"""Global (KVzip's default): one threshold over every layer and KV head together. A budget of C entries
per head keeps the C x layers x heads best-scoring entries of the whole cache, wherever they are, so a
layer or head whose entries matter more keeps more. The scores of all layers must be comparable, as
attention probabilities are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import Allocation, top_of_pool

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Global(Allocation):
    name: ClassVar[str] = "global"
    summary: ClassVar[str] = "one threshold over all layers and KV heads (KVzip): the same total, spread by score"

    def select(self, pooled: list[torch.Tensor], chosen: int) -> list[torch.Tensor]:
        import torch

        scores = torch.stack([layer.cpu().float() for layer in pooled])  # [L, H_kv, P]
        none = torch.zeros(scores.shape, dtype=torch.bool)
        return list(top_of_pool(scores, scores[..., 0].numel() * chosen, none).unbind(0))
