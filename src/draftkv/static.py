"""The static decode step: every step has the same shapes and addresses, so a GPU replays it as one
CUDA graph instead of launching each kernel from Python.

Each layer's kept entries are copied into preallocated slots (`cache.FixedSlotLayer`) with room for
every new token; a per-head mask of the same width marks the filled slots and is updated in place,
and the slot of the next token, the token ids and the positions are device tensors. The widths are
rounded up to a bucket, so requests of similar sizes share one capture: on CUDA the step is captured
once per model, batch size and bucket, and later requests load their entries into its buffers. On
other devices the same step runs uncaptured and gives the eager step's tokens.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache

from .attention import DECODE_ATTENTION, ragged_attention
from .cache import FixedSlotLayer, PerHeadLayer, _with_layers, layer_entries

BUCKET = 256  # slots: a request's cache width plus its new tokens, rounded up to a multiple of this
STATIC_IMPLEMENTATIONS = ("sdpa", "eager")  # those whose mask the layers can replace (flex takes a BlockMask)


def bucket(width: int) -> int:
    return -(-width // BUCKET) * BUCKET


def supports_static(model: torch.nn.Module, cache: DynamicCache | None) -> str | None:
    """Why this decode cannot take the static step (None: it can)."""
    implementation = (model.config._attn_implementation or "eager").removeprefix("draftkv_")
    if implementation not in STATIC_IMPLEMENTATIONS:
        return f"the {implementation} attention takes no per-head mask"
    if cache is None or not cache.layers:
        return "no cache"
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return "a sliding-window layer rolls its entries"
    if any(not layer.is_initialized for layer in cache.layers):
        return "an empty layer"
    return None


@dataclass
class _Buffers:
    """One capture's fixed tensors: the cache's slots, the step's inputs and its output."""

    cache: DynamicCache
    step: torch.Tensor  # [1] long: new tokens written so far
    tokens: torch.Tensor  # [B, 1]
    positions: torch.Tensor  # [B, 1]
    logits: torch.Tensor | None = None  # [B, V], written by every step
    graph: torch.cuda.CUDAGraph | None = None


# Per model, its one capture (the latest shape): a new shape frees the old before it takes memory.
_captures: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, _Buffers]] = weakref.WeakKeyDictionary()


def release(model: torch.nn.Module) -> None:
    """Free a model's captured step and its buffers."""
    _captures.pop(model, None)


class StaticStep:
    """One decoding step of fixed shape (see the module's docstring); the same call as `EagerStep`.

    `graphs`: capture and replay a CUDA graph (default: on CUDA). The request's cache is read once,
    into the step's own slots, and is left as it was."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, attention_mask: torch.Tensor | None,
                 steps: int, graphs: bool | None = None) -> None:
        self.model = model
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        entries = [layer_entries(layer, attention_mask if not isinstance(layer, PerHeadLayer) else None)
                   for layer in cache.layers]
        keys = entries[0][0]
        shape = (keys.shape[0], keys.dtype, tuple(bucket(k.shape[2] + steps) for k, _, _ in entries),
                 tuple((k.shape[1], k.shape[3], v.shape[3]) for k, v, _ in entries))
        held = _captures.get(model)
        if held is not None and held[0] == shape and self.graphs:
            self.buffers = held[1]
        else:
            release(model)  # before the new buffers take memory
            self.buffers = self._buffers(shape, entries)
            if self.graphs:
                _captures[model] = (shape, self.buffers)
        for layer, (layer_keys, layer_values, valid) in zip(self.buffers.cache.layers, entries, strict=True):
            layer.load(layer_keys, layer_values, valid)
        self.buffers.step.zero_()
        self.cache = self.buffers.cache

    @staticmethod
    def _buffers(shape: tuple, entries: list) -> _Buffers:
        batch, _, capacities, _ = shape
        device = entries[0][0].device
        step = torch.zeros(1, dtype=torch.long, device=device)
        layers = [FixedSlotLayer(capacity, keys, values, step)
                  for capacity, (keys, values, _) in zip(capacities, entries, strict=True)]
        return _Buffers(_with_layers(layers), step, torch.zeros(batch, 1, dtype=torch.long, device=device),
                        torch.zeros(batch, 1, dtype=torch.long, device=device))

    def _forward(self) -> None:
        buffers = self.buffers
        with sdpa_kernel(DECODE_ATTENTION), ragged_attention(self.model, buffers.cache):
            out = self.model(input_ids=buffers.tokens, position_ids=buffers.positions, cache=buffers.cache,
                             use_cache=True, logits_to_keep=1)
        if buffers.logits is None:
            buffers.logits = torch.empty_like(out.logits[:, -1])
        buffers.logits.copy_(out.logits[:, -1])
        buffers.step.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graphs ask), put the state back, then capture one step."""
        buffers = self.buffers
        saved = [layer.valid.clone() for layer in buffers.cache.layers]
        side = torch.cuda.Stream(device=self.model.device)
        side.wait_stream(torch.cuda.current_stream(self.model.device))
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream(self.model.device).wait_stream(side)
        buffers.step.zero_()
        for layer, valid in zip(buffers.cache.layers, saved, strict=True):
            layer.valid.copy_(valid)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward()
        buffers.graph = graph

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after `tokens` [B, 1] at `positions` [B, 1]."""
        buffers = self.buffers
        buffers.tokens.copy_(tokens)
        buffers.positions.copy_(positions)
        if not self.graphs:
            self._forward()
        else:
            if buffers.graph is None:
                self._capture()
            buffers.graph.replay()
        return buffers.logits.clone()
