"""The importance primitive of ALGORITHMS.md: window-query attention over the prompt's keys.

importance(Q_win, K) = pool(reduce(softmax(Q_win K^T * scale)[..., :prefix]))

Only the window queries are ever multiplied against all keys (O(q * n) memory per layer, in
query chunks), never the n x n attention matrix. The model's own fused attention computes the
attention output; this module only scores.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

Reduction = Literal["max", "mean"]
Pooling = Literal["max", "avg"]

# Every importance score is computed and accumulated in this dtype, whatever the model runs in: a
# bfloat16 model's queries and keys are upcast before their product, so a ranking never flips on
# bfloat16 rounding (ALGORITHMS.md, invariant 10). Read at call time: the tests raise it to float64.
SCORE_DTYPE = torch.float32

# Bound on the float32 attention probabilities materialised at once (per layer and call). It is a
# peak that dense's prefill does not have: with 256 MiB, H2O (all queries) peaked at 1.47x dense's
# memory at 2k on a CPU. A GPU keeps the larger bound: there each product is a kernel launch.
_MAX_PROBABILITY_BYTES = 64 * 2**20
_MAX_PROBABILITY_BYTES_GPU = 256 * 2**20
# Keys per matrix product on a CPU: BLAS libraries keep their packing buffers (sized by the operands)
# for reuse, so one product over all n keys would leave memory behind that dense attention never
# needs (12 MiB at 8k tokens with MKL). A GPU keeps no such buffers, and each product is a launch.
_KEY_CHUNK = 1024


def window_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    prefix_length: int,
    scaling: float | None = None,
    allowed: torch.Tensor | None = None,
    query_weight: torch.Tensor | None = None,
    reduction: Reduction = "max",
    softcap: float | None = None,
) -> torch.Tensor:
    """Reduce the window queries' attention over the first `prefix_length` keys.

    query: [B, H_q, q, d], the window queries (after RoPE). key: [B, H_kv, k, d], all keys the
    queries attend to (after RoPE). The last query sits at key position k - 1.
    allowed: boolean [B, 1 or H_q, q, k] (True = may attend); None means causal, with query i at
    key position k - q + i. query_weight: [B, q] weights (bool or float) on each query's
    probabilities; a weight of 0 (an invalid query) contributes nothing. The logits follow the model's
    own rule: its `scaling`, then its `softcap` (Gemma 2: softcap * tanh(logits / softcap)).

    Returns [B, H_kv, prefix_length] scores in SCORE_DTYPE (float32): the max (or the sum, for "mean") over the query
    heads of each KV group and over the (weighted) queries. Sums are turned into means by the caller,
    who knows the total count across calls (see `reduced_count`).
    """
    batch, num_heads, num_queries, head_dim = query.shape
    num_kv_heads, key_length = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)

    keys = key.to(SCORE_DTYPE)
    out = torch.zeros(batch, num_kv_heads, prefix_length, dtype=SCORE_DTYPE, device=query.device)
    on_cpu = key.device.type == "cpu"
    chunk = max(1, (_MAX_PROBABILITY_BYTES if on_cpu else _MAX_PROBABILITY_BYTES_GPU)
                // (out.element_size() * num_heads * key_length))
    key_chunk = _KEY_CHUNK if on_cpu else key_length
    for start in range(0, num_queries, chunk):
        stop = min(start + chunk, num_queries)
        size = stop - start
        # Causal queries see no key past the chunk's last query: those logits are never computed.
        visible = key_length if allowed is not None else key_length - num_queries + stop
        q = (query[:, :, start:stop].to(SCORE_DTYPE) * scale).reshape(batch, num_kv_heads, group * size, head_dim)
        logits = torch.empty(batch, num_kv_heads, group * size, visible, dtype=SCORE_DTYPE, device=query.device)
        for first in range(0, visible, key_chunk):
            last = min(first + key_chunk, visible)
            torch.matmul(q, keys[:, :, first:last].transpose(-1, -2), out=logits[..., first:last])
        logits = logits.view(batch, num_kv_heads, group, size, visible)
        if softcap:
            logits.div_(softcap).tanh_().mul_(softcap)
        if allowed is None:
            # Only the chunk's own last `size` keys can lie after one of its queries.
            future = torch.ones(size, size, dtype=torch.bool, device=query.device).triu(1)
            logits[..., visible - size:].masked_fill_(future, float("-inf"))
        else:
            mask = allowed[:, :, start:stop]
            mask = mask.view(batch, -1, 1, size, key_length) if mask.shape[1] == 1 else \
                mask.view(batch, num_kv_heads, group, size, key_length)
            logits.masked_fill_(~mask, float("-inf"))
        width = min(prefix_length, visible)
        probs = torch.softmax(logits, dim=-1)[..., :width]
        if allowed is not None:
            # A query row with every key masked (left padding) gives NaN: it attends to nothing.
            probs = torch.nan_to_num(probs, nan=0.0)
        if query_weight is not None:
            probs = probs * query_weight[:, start:stop].to(probs.dtype).view(batch, 1, 1, size, 1)
        if reduction == "max":
            out[..., :width] = torch.maximum(out[..., :width], probs.amax(dim=(2, 3)))
        else:
            out[..., :width] += probs.sum(dim=(2, 3))
    return out


def reduced_count(num_heads: int, num_kv_heads: int, num_queries: int | torch.Tensor) -> torch.Tensor | int:
    """How many (query head, query) pairs a KV head's mean is taken over."""
    return (num_heads // num_kv_heads) * num_queries


def pool_scores(scores: torch.Tensor, kernel: int, pooling: Pooling = "max") -> torch.Tensor:
    """Smooth scores [..., n] along the last axis with an odd kernel; the length stays n."""
    if kernel == 1:
        return scores
    if kernel % 2 == 0:
        raise ValueError(f"pooling kernel must be odd so the length is kept, got {kernel}")
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "max":
        pooled = F.max_pool1d(flat, kernel, stride=1, padding=kernel // 2)
    else:
        pooled = F.avg_pool1d(flat, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return pooled.view(shape)
