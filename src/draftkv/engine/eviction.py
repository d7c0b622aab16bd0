"""Decode-time eviction: keep the cache bounded during long generations.

Every `evict_every` new tokens, each layer and KV head is cut back to the method's budget with the
method's own rule, scored by the attention of the generated tokens: StreamingLLM keeps the sinks and
the most recent entries; H2O sums the attention every cached entry received from all generated
tokens; SnapKV-style methods take the max over the last `window` generated tokens and always keep
those. So a long answer never grows the cache past budget + evict_every entries.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from ..methods import Method
from .attention import RowSlot, Timer
from .cache import compressed_layers, gather_positions
from .scoring import window_scores


class DecodeEviction:
    """A collector (attention.Collector) for decoding steps that also evicts, through the decode loop's
    `after_step`."""

    def __init__(self, method: Method, budget: int) -> None:
        self.method = method
        self.budget = budget
        scorer = method.decode_scorer()
        self.summed = scorer is not None and scorer.all_queries
        self.window = scorer.window if scorer is not None else 0
        self.history: dict[int, list[torch.Tensor]] = {}  # per layer: recent steps' [B, H_kv, K_t] attention
        self.steps = 0
        self.evictions = 0
        self.slot: RowSlot | None = None  # decoding reads the whole batch at once
        self.timer = Timer()

    @property
    def seconds(self) -> float:
        return self.timer.seconds

    def start_call(self) -> None:
        """Every decoding step is scored the same way: nothing to reset."""

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None, softcap: float | None = None,
                sliding: bool = False) -> None:
        if self.window == 0 or query.shape[2] != 1 or sliding:
            return  # StreamingLLM needs no scores; only single new tokens are decoding steps
        with self.timer.measure(query.device):
            self._observe(layer_idx, query, key, scaling, softcap)

    def _observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float | None,
                 softcap: float | None) -> None:
        scores = window_scores(query, key, prefix_length=key.shape[2], scaling=scaling, softcap=softcap,
                               reduction="mean" if self.summed else "max")
        steps = self.history.setdefault(layer_idx, [])
        if self.summed and steps:  # a running sum, one column longer each step
            steps[0] = torch.nn.functional.pad(steps[0], (0, scores.shape[-1] - steps[0].shape[-1])) + scores
        else:
            steps.append(scores)
            del steps[: -self.window]  # the last `window` steps are all a SnapKV-style rule reads

    def layer_scores(self, layer_idx: int, length: int) -> torch.Tensor:
        """[B, H_kv, length]: every cached entry's score (0 for entries no recorded step saw)."""
        steps = self.history.get(layer_idx)
        if not steps:
            return torch.zeros(1, 1, length)
        padded = [torch.nn.functional.pad(s, (0, length - s.shape[-1])) for s in steps]
        return padded[0] if self.summed else torch.stack(padded).amax(dim=0)

    def after_step(self, cache: DynamicCache) -> None:
        self.steps += 1
        layers = compressed_layers(cache)  # a sliding window already keeps only its window
        if not layers:
            return
        length = cache.layers[layers[0]].get_seq_length()
        if self.steps % self.method.evict_every or length <= self.budget:
            return
        heads = cache.layers[layers[0]].keys.shape[1]
        index = []
        for layer in layers:
            scores = self.layer_scores(layer, length)[0].expand(heads, -1)[:, : length - self.window]
            kept = self.method.keep_positions([scores.float()], length, self.budget)[0][None]  # [1, H_kv, budget]
            index.append(kept)
            # Recorded steps follow their entries to the new places (entries a step never saw score 0).
            self.history[layer] = [torch.nn.functional.pad(step, (0, length - step.shape[-1])).gather(2, kept.to(step.device))
                                   for step in self.history.get(layer, [])]
        gather_positions(cache, index, keep_capacity=True)
        self.evictions += 1
