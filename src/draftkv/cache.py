"""The compressed KV cache: a transformers DynamicCache whose layers hold only kept entries.

Entries keep the RoPE of their original positions (keys are cached after RoPE), so decoding goes
on at the logical position n, n+1, ... while the physical cache holds fewer entries. The decode
loop passes explicit `position_ids` (logical) and an attention mask as long as the physical cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by the cache's key and value tensors."""
    return sum(layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
               for layer in cache.layers if layer.is_initialized)


def bytes_per_entry(cache: DynamicCache) -> int:
    """Bytes of one position's keys and values over all layers and KV heads (batch row 1)."""
    total = 0
    for layer in cache.layers:
        _, heads, _, head_dim = layer.keys.shape
        total += heads * head_dim * (layer.keys.element_size() + layer.values.element_size())
    return total


def drop_tail(cache: DynamicCache, length: int) -> None:
    """Keep only the first `length` positions of every layer (drops the lookahead probe)."""
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, :length]
        layer.values = layer.values[:, :, :length]


def gather_positions(cache: DynamicCache, kept_per_layer: list[torch.Tensor]) -> None:
    """Keep, in every layer, the entries at `kept_per_layer[l]` ([B, H_kv, K] indices), in place."""
    for layer, kept in zip(cache.layers, kept_per_layer, strict=True):
        index = kept.to(layer.keys.device)[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layer.keys = layer.keys.gather(2, index)
        layer.values = layer.values.gather(2, index)


def gathered_copy(cache: DynamicCache, kept_per_layer: list[torch.Tensor]) -> DynamicCache:
    """A new cache holding only the entries at `kept_per_layer` ([B, H_kv, K] per layer); `cache` is kept."""
    layers = []
    for layer, kept in zip(cache.layers, kept_per_layer, strict=True):
        index = kept.to(layer.keys.device)[..., None].expand(-1, -1, -1, layer.keys.shape[-1])
        layers.append((layer.keys.gather(2, index), layer.values.gather(2, index)))
    return DynamicCache(layers)
