"""What every allocation shares: a KV method's pooled scores in, the entries each layer and KV head
keeps by score out, as masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Allocation:
    """How `chosen` entries per layer and KV head (on average) are spread over the layers and heads."""

    name: ClassVar[str]
    summary: ClassVar[str]

    def select(self, pooled: list[torch.Tensor], chosen: int) -> list[torch.Tensor]:
        """Per layer, which prefix entries are kept by score: [H_kv, P] bool on the CPU, from the pooled
        scores [H_kv, P] of the entries that compete (protected ones, such as sinks, score +inf and so
        come first; the window is not among them)."""
        raise NotImplementedError


def best_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The positions of the `count` highest scores along the last dimension, on the CPU. Ties (max
    pooling makes plateaus) go to the earlier position, so every device keeps the same entries;
    `topk` breaks them differently on a CPU and a GPU."""
    import torch

    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count].cpu()


def top_per_head(scores: torch.Tensor, count: int) -> torch.Tensor:
    """[H, P] bool: each head's `count` best entries."""
    import torch

    mask = torch.zeros(scores.shape, dtype=torch.bool)
    return mask.scatter_(-1, best_positions(scores, count), True)


def top_of_pool(scores: torch.Tensor, count: int, taken: torch.Tensor) -> torch.Tensor:
    """`taken` [..., P] bool with the `count` best of the entries not yet taken added, whatever their head
    or layer: one threshold over the whole pool."""
    rest = scores.cpu().float().masked_fill(taken, float("-inf")).flatten()
    chosen = taken.clone()
    chosen.view(-1)[best_positions(rest, count)] = True
    return chosen
