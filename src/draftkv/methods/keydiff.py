"""KeyDiff: KV dropping by key diversity, query-agnostic and attention-free (arXiv 2504.15364).

An entry's importance is its key's cosine distance from the mean key of its layer and KV head over
the prompt: keys unlike the rest carry what the others do not, and keys alike are redundant. No
query is read, so the scores need no capture in the prefill and do not depend on the question. The
last `window` entries and the first `sink` (attention sinks) are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from .base import SinkKVMethod, param
from .scorers import TargetReading

if TYPE_CHECKING:
    import torch

    from ..engine.attention import WindowCollector


@dataclass(frozen=True)
class KeyDistance:
    """Each prompt key's cosine distance from its head's mean key, for the first `width - window` columns."""

    window: int

    def collector(self, width: int) -> None:
        return None

    def decode_collector(self) -> KeyDistanceNow:
        return KeyDistanceNow(self.window)

    def scores(self, collected: WindowCollector | None, reading: TargetReading) -> list[torch.Tensor]:
        import torch
        import torch.nn.functional as F

        from ..engine import scoring

        mask = reading.batch.attention_mask  # padding columns hold zero keys and take no part in the mean
        scores = []
        for keys in reading.full_layer_keys():
            keys = keys.to(scoring.SCORE_DTYPE)
            weight = mask[:, None, :, None].to(keys.dtype) if mask is not None else torch.ones_like(keys[..., :1])
            mean = (keys * weight).sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True)
            distance = 1 - F.cosine_similarity(keys, mean, dim=-1)
            scores.append(distance[..., : keys.shape[2] - self.window])
        return scores


class KeyDistanceNow:
    """Decode-time scores: each cached key's cosine distance from its head's mean key over the cache as it
    is now (engine.eviction.DecodeScores); it reads the cache, not the decoding steps."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.slot = None
        self.seconds = 0.0

    def start_call(self) -> None:
        """Nothing is read during the steps."""

    def observe(self, *args, **kwargs) -> None:
        """Nothing is read during the steps."""

    def layer_scores(self, layer_idx: int, layer, length: int) -> torch.Tensor:
        import torch.nn.functional as F

        from ..engine import scoring

        keys = layer.keys[0, :, :length].to(scoring.SCORE_DTYPE)  # [H_kv, length, d]
        distance = 1 - F.cosine_similarity(keys, keys.mean(dim=1, keepdim=True), dim=-1)
        return distance[:, : length - self.window].cpu()

    def follow(self, layer_idx: int, kept: torch.Tensor, length: int) -> None:
        """Nothing recorded: the next eviction reads the cache again."""


@dataclass(frozen=True)
class KeyDiff(SinkKVMethod):
    name: ClassVar[str] = "keydiff"
    summary: ClassVar[str] = "KV dropping by key diversity: distance from the head's mean key (no attention, query-agnostic)."

    reduction: str = param("max", "unused: KeyDiff reads no queries")

    def kv_scorer(self) -> KeyDistance:
        return KeyDistance(self.window)
