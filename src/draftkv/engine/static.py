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
from dataclasses import dataclass

import torch
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .attention import DECODE_ATTENTION, own_implementation, ragged_attention
from .cache import FixedSlotLayer, cache_of_layers, select_rows

STATIC_IMPLEMENTATIONS = ("sdpa", "eager")  # those whose mask the layers can replace (flex takes a BlockMask)
# Per model, the call widths whose kernels ran once before a capture.
_warmed: weakref.WeakKeyDictionary[torch.nn.Module, set[int]] = weakref.WeakKeyDictionary()


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
        self.batch = layers[0].keys.shape[0]
        self.shapes: dict[int, _Shape] = {}  # by the tokens a call reads: 1 for a decode step, k + 1 to check k

    def select(self, rows: list[int], taken: int) -> StaticStep:
        """A new static step for the batch rows `rows` alone, after `taken` steps (finished rows dropped)."""
        chosen = self.rows_alone(rows, self.steps - taken)
        chosen.steps = self.steps  # of the whole decode, as `taken` counts
        return chosen

    def rows_alone(self, rows: list[int], room: int | None = None) -> StaticStep:
        """A new static step of the batch rows `rows` alone, with slots for `room` more tokens (default: as
        many as this step has left). The rows' entries are copied out of this step's slots."""
        layer = self.cache.layers[0]
        room = layer.capacity - layer.filled if room is None else room
        index = torch.tensor(rows, device=self.model.device)
        return StaticStep(self.model, select_rows(self.cache, index, room, trim=True), None, room, self.graphs,
                          consume=True)

    def _forward(self, shape: _Shape) -> None:
        with sdpa_kernel(DECODE_ATTENTION), ragged_attention(self.model, self.cache):
            out = self.model(input_ids=shape.tokens, position_ids=shape.positions, cache=self.cache, use_cache=True,
                             logits_to_keep=shape.width)
        if shape.logits is None:
            shape.logits = torch.empty_like(out.logits)
        shape.logits.copy_(out.logits)
        self.step.add_(shape.width)

    def _capture(self, shape: _Shape) -> None:
        """Capture a call of this shape as a CUDA graph. A model's first capture of a width is preceded by
        one call on a side stream (lazy kernel set-up must not happen during a capture), whose writes are
        then undone."""
        device = self.model.device
        if shape.width not in _warmed.setdefault(self.model, set()):
            step = self.step.clone()
            saved = [layer.valid.clone() for layer in self.cache.layers]
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                self._forward(shape)
            torch.cuda.current_stream(device).wait_stream(side)
            self.step.copy_(step)
            for layer, valid in zip(self.cache.layers, saved, strict=True):
                layer.valid.copy_(valid)
            _warmed[self.model].add(shape.width)
        shape.graph = torch.cuda.CUDAGraph()
        # thread_local: the draft may decode in another thread while the target prefills (execute.py)
        with torch.cuda.graph(shape.graph, capture_error_mode="thread_local"):
            self._forward(shape)

    @torch.inference_mode()
    def read(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, W, V] after `tokens` [B, W] at `positions` [B, W], written to the next W slots."""
        width = tokens.shape[1]
        if width not in self.shapes:
            self.shapes[width] = _Shape(width, torch.zeros(self.batch, width, dtype=torch.long, device=self.model.device),
                                        torch.zeros(self.batch, width, dtype=torch.long, device=self.model.device))
        shape = self.shapes[width]
        shape.tokens.copy_(tokens)
        shape.positions.copy_(positions)
        if not self.graphs:
            self._forward(shape)
        else:
            if shape.graph is None:
                self._capture(shape)
            shape.graph.replay()
        return shape.logits.clone()

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] after `tokens` [B, 1] at `positions` [B, 1]."""
        return self.read(tokens, positions)[:, -1]

    def free(self, counts: list[int]) -> None:
        """Free each row's last `counts[row]` tokens read (a batch's refused proposals and fillers); the
        rows go on writing at the shared next slot."""
        if any(counts):
            last = torch.tensor(counts, device=self.model.device)
            for layer in self.cache.layers:
                layer.free_rows(last)

    def take_back(self, count: int) -> None:
        """Forget the last `count` tokens read (refused proposals): their slots are written again next."""
        if count > 0:
            for layer in self.cache.layers:
                layer.forget(count)
            self.step.sub_(count)


@dataclass
class _Shape:
    """The buffers (and, on CUDA, the graph) of calls that read `width` tokens per row."""

    width: int
    tokens: torch.Tensor
    positions: torch.Tensor
    logits: torch.Tensor | None = None
    graph: torch.cuda.CUDAGraph | None = None
