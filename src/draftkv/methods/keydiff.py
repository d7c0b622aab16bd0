"""KeyDiff: KV dropping by key diversity, query-agnostic and attention-free (arXiv 2504.15364).

An entry's importance is its key's cosine distance from the mean key of its layer and KV head over
the prompt: keys unlike the rest carry what the others do not, and keys alike are redundant. No
query is read, so the scores need no capture in the prefill and do not depend on the question. The
last `window` entries and the first `sink` (attention sinks) are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..engine.attention import WindowCollector
from ..errors import ConfigError
from .base import WindowKVMethod, check_int, param
from .scorers import TargetReading


@dataclass(frozen=True)
class KeyDistance:
    """Each prompt key's cosine distance from its head's mean key, for the first `width - window` columns."""

    window: int

    def collector(self, width: int) -> None:
        return None

    def scores(self, collected: WindowCollector | None, reading: TargetReading) -> list[torch.Tensor]:
        mask = reading.batch.attention_mask  # padding columns hold zero keys and take no part in the mean
        scores = []
        for keys in reading.full_layer_keys():
            keys = keys.float()
            weight = mask[:, None, :, None].to(keys.dtype) if mask is not None else torch.ones_like(keys[..., :1])
            mean = (keys * weight).sum(dim=2, keepdim=True) / weight.sum(dim=2, keepdim=True)
            distance = 1 - F.cosine_similarity(keys, mean, dim=-1)
            scores.append(distance[..., : keys.shape[2] - self.window])
        return scores


@dataclass(frozen=True)
class KeyDiff(WindowKVMethod):
    name: ClassVar[str] = "keydiff"
    summary: ClassVar[str] = "KV dropping by key diversity: distance from the head's mean key (no attention, query-agnostic)."

    window: int = param(32, "last prompt tokens always kept (they are not scored)")
    kernel: int = param(1, "odd pooling kernel along keys (1 = none, as in KeyDiff)")
    reduction: str = param("max", "unused: KeyDiff reads no queries")
    sink: int = param(4, "first prompt tokens always kept (attention sinks)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sink(self)
        if self.evict_every:
            raise ConfigError("keydiff scores the prompt's keys once; decode-time eviction (evict_every) is not "
                              "supported, give evict_every=0")

    def kv_scorer(self) -> KeyDistance:
        return KeyDistance(self.window)

    def decode_scorer(self) -> None:
        return None

    def keep_positions(self, layer_scores: list[torch.Tensor], prompt_length: int, budget: int) -> list[torch.Tensor]:
        return super().keep_positions(with_sinks(layer_scores, self.sink), prompt_length, budget)


def check_sink(method: KeyDiff | WindowKVMethod) -> None:
    """`sink` first entries are kept besides the window: both fit in a token budget with room to choose."""
    check_int("sink", method.sink, 0)
    if isinstance(method.budget, int) and method.sink + method.window >= method.budget:
        raise ConfigError(f"sink + window ({method.sink + method.window}) must be smaller than the budget "
                          f"({method.budget})")


def with_sinks(layer_scores: list[torch.Tensor], sink: int) -> list[torch.Tensor]:
    """Scores [H_kv, S] per layer with the first `sink` positions first in line (ties keep the earlier)."""
    sinks = min(sink, layer_scores[0].shape[-1])
    return [scores.index_fill(-1, torch.arange(sinks, device=scores.device), float("inf")) for scores in layer_scores]
