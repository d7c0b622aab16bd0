"""The static decode step: every step has the same shapes and addresses, so a GPU replays it as one
CUDA graph instead of launching each kernel from Python.

Each layer's kept entries are copied into preallocated slots (`cache.FixedSlotLayer`) with room for
every new token; a per-head mask of the same width marks the filled slots and is updated in place,
and the slot of the next token, the token ids and the positions are device tensors. On CUDA the first
step is captured as a graph and every step replays it. A capture lives as long as its decode: kept
for later requests, its cache-sized buffers would hold memory that the next request's prefill needs.
On other devices the same step runs uncaptured and gives the eager step's tokens.
"""

from __future__ import annotations

import weakref

import torch
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import DECODE_ATTENTION, own_implementation, ragged_attention
from .cache import FixedSlotLayer, cache_of_layers, select_rows

STATIC_IMPLEMENTATIONS = ("sdpa", "eager")  # those whose mask the layers can replace (flex takes a BlockMask)
_warmed: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # models whose kernels ran once before a capture


def supports_static(model: torch.nn.Module, cache: DynamicCache | None) -> str | None:
    """Why this decode cannot take the static step (None: it can)."""
    implementation = own_implementation(model)
    if implementation not in STATIC_IMPLEMENTATIONS:
        return f"the {implementation} attention takes no per-head mask"
    if cache is None or not cache.layers:
        return "no cache"
    if any(layer.is_sliding for layer in cache.layers):
        return "a sliding-window layer rolls its entries"
    if any(not layer.is_initialized for layer in cache.layers):
        return "an empty layer"
    return None


class StaticStep:
    """One decoding step of fixed shape (see the module's docstring); the same call as `EagerStep`.

    `graphs`: capture and replay a CUDA graph (default: on CUDA). The request's cache is read once,
    into the step's own slots, and is left as it was; with `consume`, each of its layers is let go of
    as soon as it is copied, so the copy never doubles the cache's memory."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, attention_mask: torch.Tensor | None,
                 steps: int, graphs: bool | None = None, consume: bool = False) -> None:
        self.model, self.steps = model, steps
        self.graphs = model.device.type == "cuda" if graphs is None else graphs
        self.step = torch.zeros(1, dtype=torch.long, device=model.device)  # new tokens written so far
        layers = []
        for at, layer in enumerate(cache.layers):
            keys, values, valid = layer.entries(attention_mask)
            fixed = FixedSlotLayer(keys.shape[2] + steps, keys, values, self.step)
            fixed.load(keys, values, valid)
            layers.append(fixed)
            if consume:
                del keys, values, valid
                cache.layers[at] = DynamicLayer()
        self.cache = cache_of_layers(layers)
        batch = layers[0].keys.shape[0]
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.logits: torch.Tensor | None = None  # [B, V], written by every step
        self.graph: torch.cuda.CUDAGraph | None = None

    def select(self, rows: list[int], taken: int) -> StaticStep:
        """A new static step for the batch rows `rows` alone, after `taken` steps (finished rows dropped)."""
        index = torch.tensor(rows, device=self.model.device)
        remaining = self.steps - taken
        chosen = StaticStep(self.model, select_rows(self.cache, index, remaining, trim=True), None, remaining, self.graphs)
        chosen.steps = self.steps  # of the whole decode, as `taken` counts
        return chosen

    def _forward(self) -> None:
        with sdpa_kernel(DECODE_ATTENTION), ragged_attention(self.model, self.cache):
            out = self.model(input_ids=self.tokens, position_ids=self.positions, cache=self.cache, use_cache=True,
                             logits_to_keep=1)
        if self.logits is None:
            self.logits = torch.empty_like(out.logits[:, -1])
        self.logits.copy_(out.logits[:, -1])
        self.step.add_(1)

    def _capture(self) -> None:
        """Capture one step as a CUDA graph. A model's first capture is preceded by one step on a side
        stream (lazy kernel set-up must not happen during a capture), whose writes are then undone."""
        device = self.model.device
        if self.model not in _warmed:
            saved = [layer.valid.clone() for layer in self.cache.layers]
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream(device).wait_stream(side)
            self.step.zero_()
            for layer, valid in zip(self.cache.layers, saved, strict=True):
                layer.valid.copy_(valid)
            _warmed.add(self.model)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: the draft may decode in another thread while the target prefills (execute.py)
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._forward()

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after `tokens` [B, 1] at `positions` [B, 1]."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if not self.graphs:
            self._forward()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        return self.logits.clone()
