"""Decode-time eviction: keep the cache bounded during long generations.

Every `every` new tokens, each layer and KV head is cut back to the budget with the method's own rule
(`keep`), on the scores its scorer's decode-time collector gives the cached entries: the attention of
the generated tokens for attention scorers (SnapKV-style: the max over the last `window` steps; H2O:
the attention summed over all of them), key distances for KeyDiff; none for StreamingLLM, which keeps
by position. So a long answer never grows the cache past budget + every entries. The engine knows no
method: it is handed the collector and the rule.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin

from .attention import RowSlot, TimedCollector
from .cache import compressed_layers, gather_positions
from .scoring import window_scores

KeepRule = Callable[[list[torch.Tensor], int, int], list[torch.Tensor]]  # Method.keep_positions


class DecodeScores(Protocol):
    """A scorer's decode-time collector (attention.Collector): what it scores of the cached entries."""

    window: int  # the last entries, always kept, that it does not score
    slot: RowSlot | None
    seconds: float

    def start_call(self) -> None: ...

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None, softcap: float | None = None, sliding: bool = False) -> None: ...

    def layer_scores(self, layer_idx: int, layer: CacheLayerMixin, length: int) -> torch.Tensor:
        """[H_kv, length - window]: the score of each cached entry but the last `window`."""

    def follow(self, layer_idx: int, kept: torch.Tensor, length: int) -> None:
        """Of its `length` entries the layer kept `kept` [1, H_kv, K], in that order: what the collector
        recorded follows them."""


class AttentionHistory(TimedCollector):
    """Decode-time scores from the generated tokens' attention: the max over the last `window` steps, or
    (`summed`, H2O) the attention each entry received from every step so far."""

    def __init__(self, window: int, summed: bool) -> None:
        self.window = window
        self.summed = summed
        self.history: dict[int, list[torch.Tensor]] = {}  # per layer: recent steps' [B, H_kv, K_t] attention
        super().__init__()

    def start_call(self) -> None:
        """Every decoding step is scored the same way: nothing to reset."""

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None, softcap: float | None = None, sliding: bool = False) -> None:
        if query.shape[2] != 1 or sliding:
            return  # only single new tokens are decoding steps
        with self.timer.measure(query.device):
            scores = window_scores(query, key, prefix_length=key.shape[2], scaling=scaling, softcap=softcap,
                                   reduction="mean" if self.summed else "max")
            steps = self.history.setdefault(layer_idx, [])
            if self.summed and steps:  # a running sum, one column longer each step
                steps[0] = torch.nn.functional.pad(steps[0], (0, scores.shape[-1] - steps[0].shape[-1])) + scores
            else:
                steps.append(scores)
                del steps[: -self.window]  # the last `window` steps are all a SnapKV-style rule reads

    def layer_scores(self, layer_idx: int, layer: CacheLayerMixin, length: int) -> torch.Tensor:
        heads = layer.keys.shape[1]
        steps = self.history.get(layer_idx)
        if not steps:
            return torch.zeros(heads, length - self.window)
        padded = [torch.nn.functional.pad(s, (0, length - s.shape[-1])) for s in steps]  # unseen entries score 0
        scores = padded[0] if self.summed else torch.stack(padded).amax(dim=0)
        return scores[0].expand(heads, -1)[:, : length - self.window]

    def follow(self, layer_idx: int, kept: torch.Tensor, length: int) -> None:
        self.history[layer_idx] = [torch.nn.functional.pad(step, (0, length - step.shape[-1])).gather(2, kept.to(step.device))
                                   for step in self.history.get(layer_idx, [])]


class DecodeEviction:
    """A collector for decoding steps (its scorer's, if any) that also evicts, through the decode loop's
    `after_step`: every `every` steps, a cache longer than `budget` is cut back to it by `keep`."""

    def __init__(self, scores: DecodeScores | None, keep: KeepRule, every: int, budget: int) -> None:
        self.scores = scores
        self.keep = keep
        self.every = every
        self.budget = budget
        self.steps = 0
        self.evictions = 0
        self.slot: RowSlot | None = None

    @property
    def seconds(self) -> float:
        return self.scores.seconds if self.scores is not None else 0.0

    def start_call(self) -> None:
        if self.scores is not None:
            self.scores.start_call()

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None, softcap: float | None = None, sliding: bool = False) -> None:
        if self.scores is not None:
            self.scores.observe(layer_idx, query, key, attention_mask, scaling, softcap, sliding)

    def after_step(self, cache: DynamicCache) -> None:
        self.steps += 1
        layers = compressed_layers(cache)  # a sliding window already keeps only its window
        if not layers:
            return
        length = cache.layers[layers[0]].get_seq_length()
        if self.steps % self.every or length <= self.budget:
            return
        index = []
        for layer in layers:
            if self.scores is not None:
                scores = self.scores.layer_scores(layer, cache.layers[layer], length)
            else:  # by position alone
                scores = torch.zeros(cache.layers[layer].keys.shape[1], length)
            kept = self.keep([scores.float()], length, self.budget)[0][None]  # [1, H_kv, budget]
            index.append(kept)
            if self.scores is not None:
                self.scores.follow(layer, kept, length)
        gather_positions(cache, index, keep_capacity=True)
        self.evictions += 1
