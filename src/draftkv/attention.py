"""Window-query attention capture through transformers' public AttentionInterface.

We register one attention function, "draftkv", that always computes the attention output with
the stock SDPA kernel and, only while a collector is active, also hands the layer's window
queries and keys to that collector. `capture(model, collector)` switches a model to it for one
call and switches it back afterwards; nothing global stays changed but the registered name.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .scoring import Reduction, reduced_count, window_scores

ATTENTION_NAME = "draftkv"

_active_collector: contextvars.ContextVar[WindowCollector | None] = contextvars.ContextVar(
    "draftkv_active_collector", default=None
)


class WindowCollector:
    """Accumulates, per layer, the window queries' importance over the first `prefix_length` keys.

    One collector lives for one request flow and may see several forward calls (the prompt
    prefill, whose last `num_queries` queries are the window, then a chunk of lookahead tokens,
    all of whose queries count). Scores combine across calls exactly: max of maxes, or sums and
    counts for the mean, because each query's softmax is its own.
    """

    def __init__(self, prefix_length: int, reduction: Reduction = "max") -> None:
        self.prefix_length = prefix_length
        self.reduction = reduction
        self.num_queries = 0
        self.query_valid: torch.Tensor | None = None
        self._scores: dict[int, torch.Tensor] = {}
        self._counts: dict[int, torch.Tensor | int] = {}
        self.seconds = 0.0  # time spent scoring, so callers can tell it apart from the forward pass

    def score_last(self, num_queries: int, query_valid: torch.Tensor | None = None) -> None:
        """Score the last `num_queries` queries of the next forward call (query_valid: [B, q] bool)."""
        self.num_queries = num_queries
        self.query_valid = query_valid

    def observe(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
    ) -> None:
        if self.num_queries == 0:
            return
        started = _synchronized_time(query.device)
        window = query[:, :, -self.num_queries :]
        allowed = None
        if attention_mask is not None:
            rows = attention_mask[:, :, -self.num_queries :, : key.shape[2]]
            allowed = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
        scores = window_scores(
            window, key, prefix_length=self.prefix_length, scaling=scaling, allowed=allowed,
            query_valid=self.query_valid, reduction=self.reduction,
        )
        valid = self.query_valid.sum(dim=1).view(-1, 1, 1) if self.query_valid is not None else self.num_queries
        count = reduced_count(query.shape[1], key.shape[1], valid)
        if layer_idx not in self._scores:
            self._scores[layer_idx], self._counts[layer_idx] = scores, count
        elif self.reduction == "max":
            self._scores[layer_idx] = torch.maximum(self._scores[layer_idx], scores)
        else:
            self._scores[layer_idx] = self._scores[layer_idx] + scores
            self._counts[layer_idx] = self._counts[layer_idx] + count
        self.seconds += _synchronized_time(query.device) - started

    def layer_scores(self) -> list[torch.Tensor]:
        """Per layer [B, H_kv, prefix_length] float32 scores, in layer order (not yet pooled)."""
        layers = sorted(self._scores)
        if self.reduction == "max":
            return [self._scores[i] for i in layers]
        return [self._scores[i] / self._counts[i] for i in layers]


def _synchronized_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _draftkv_attention(module, query, key, value, attention_mask, **kwargs):
    collector = _active_collector.get()
    if collector is not None:
        collector.observe(module.layer_idx, query, key, attention_mask, kwargs.get("scaling"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTENTION_NAME, _draftkv_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@contextmanager
def capture(model: torch.nn.Module, collector: WindowCollector | None) -> Iterator[WindowCollector | None]:
    """Run `model` with window-query capture into `collector` for the duration of the block."""
    if collector is None:
        yield None
        return
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    token = _active_collector.set(collector)
    try:
        yield collector
    finally:
        _active_collector.reset(token)
        model.set_attn_implementation(previous)
