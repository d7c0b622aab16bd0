"""Window-query attention capture through transformers' public AttentionInterface.

For each attention implementation a model uses (sdpa, eager, flex, a kernel from the hub) we register
"draftkv_<it>": it hands the layer's queries and keys to the active collectors, which score with the
model's own logits rule (its scaling and softcapping), and then computes the attention output with
that same implementation, so the model runs exactly as it would. `capture(model, collector)` switches
a model to it for one call and back afterwards; nothing global stays changed but the registered names.
"""

from __future__ import annotations

import contextvars
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from . import scoring
from .scoring import Reduction, reduced_count, window_scores

# cuDNN attention (PyTorch's first choice on Hopper GPUs) builds an execution plan for every new
# shape, and every decode step brings a new key length: on an H100, steps at a key length not seen
# before took ~120 ms instead of ~20 (results/bench-gpu/README.md). The other kernels need no plans.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# The ragged cache a decode reads, with the ids of its model's attention modules: another model running
# meanwhile (the draft proposing tokens) reads its own cache with its own masks.
_active_ragged: contextvars.ContextVar[tuple[DynamicCache, frozenset[int]] | None] = contextvars.ContextVar(
    "draftkv_ragged", default=None)
_active_collectors: contextvars.ContextVar[tuple[Collector, ...]] = contextvars.ContextVar(
    "draftkv_active_collectors", default=()
)
# Models that read a few tokens at a time over their cache now (speculation), by module id.
_few_queries: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("draftkv_few_queries",
                                                                             default=frozenset())
FEW_QUERIES = 16  # the most tokens a call reads that `few_queries` stacks


@dataclass(frozen=True)
class RowSlot:
    """Where one row's scores go while a padded batch is prefilled one row at a time (flow.steps.prefill):
    the row runs without its `pad` columns, and its scores land at columns pad.. of that row."""

    row: int
    pad: int
    batch_size: int

    def widen(self, scores: torch.Tensor, width: int) -> torch.Tensor:
        """[1, ..., n] scores of the row -> [B, ..., width], zero elsewhere (padding gets no attention)."""
        full = scores.new_zeros(self.batch_size, *scores.shape[1:-1], width)
        full[self.row, ..., self.pad: self.pad + scores.shape[-1]] = scores[0]
        return full

    def columns(self, width: int) -> int:
        """How many of `width` padded columns are the row's own (none for a row shorter than the window)."""
        return max(width - self.pad, 0)


def allowed_rows(attention_mask, query_length: int, num_queries: int, key_length: int) -> torch.Tensor | None:
    """Which keys the last `num_queries` of `query_length` queries may attend to, [B, 1 or H, q, k] bool,
    from the mask the model built: additive or boolean (eager, sdpa), or flex attention's BlockMask,
    whose rule is evaluated on just these rows. None: plain causal."""
    if attention_mask is None:
        return None
    if isinstance(attention_mask, torch.Tensor):
        rows = attention_mask[:, :, -num_queries:, :key_length]
        return rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
    device = attention_mask.kv_num_blocks.device
    queries = torch.arange(query_length - num_queries, query_length, device=device)[:, None]
    keys = torch.arange(key_length, device=device)[None, :]
    batch = attention_mask.kv_num_blocks.shape[0]
    zero = torch.zeros((), dtype=torch.long, device=device)
    rows = [attention_mask.mask_mod(torch.full((), b, device=device), zero, queries, keys).expand(num_queries, key_length)
            for b in range(batch)]
    return torch.stack(rows)[:, None]


class Collector(Protocol):
    """What attention capture feeds: every attention call's queries and keys, layer by layer."""

    slot: RowSlot | None  # while a padded batch is read one row at a time: where this row's scores go

    def start_call(self) -> None:
        """A forward call of the model begins."""

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None, softcap: float | None = None, sliding: bool = False) -> None:
        """One layer's queries [B, H_q, q, d] and keys [B, H_kv, k, d] (after RoPE), with the model's mask
        and logits rule; `sliding`: the layer is a sliding window."""

    @property
    def seconds(self) -> float:
        """Time spent observing, so callers can tell it apart from the forward pass."""


class Timer:
    """Seconds spent scoring. On a GPU, CUDA events time the kernels without stalling the queue that
    a synchronisation per layer would; they are read (one wait) only when `seconds` is asked for."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def measure(self, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            started = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - started
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((start, end))

    @property
    def seconds(self) -> float:
        for start, end in self._events:
            end.synchronize()
            self._seconds += start.elapsed_time(end) / 1000
        self._events.clear()
        return self._seconds


class TimedCollector:
    """What every collector shares: where a row-by-row prefill's row goes (none: the whole batch at once)
    and the time spent scoring, so callers can tell it apart from the forward pass."""

    def __init__(self) -> None:
        self.slot: RowSlot | None = None
        self.timer = Timer()

    @property
    def seconds(self) -> float:
        return self.timer.seconds


class WindowCollector(TimedCollector):
    """KV-stage scores for the target. Accumulates, per layer, the window queries' importance over the first `prefix_length` keys.

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
        super().__init__()

    def start_call(self) -> None:
        """A forward call begins (the caller says which queries count through score_last)."""

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
        softcap: float | None = None,
        sliding: bool = False,
    ) -> None:
        if self.num_queries == 0 or sliding:  # a sliding window keeps its window: scoring it is wasted
            return
        with self.timer.measure(query.device):
            self._observe(layer_idx, query, key, attention_mask, scaling, softcap)

    def _observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None, softcap: float | None) -> None:
        slot, query_valid = self.slot, self.query_valid
        num_queries = min(self.num_queries, query.shape[2])
        if slot is not None and query_valid is not None:
            query_valid = query_valid[slot.row: slot.row + 1]
        allowed = allowed_rows(attention_mask, query.shape[2], num_queries, key.shape[2])
        scores = window_scores(
            query[:, :, -num_queries:], key, prefix_length=slot.columns(self.prefix_length) if slot else self.prefix_length,
            scaling=scaling, allowed=allowed, query_weight=query_valid, reduction=self.reduction, softcap=softcap,
        )
        valid = query_valid.sum(dim=1).view(-1, 1, 1) if query_valid is not None else num_queries
        count = reduced_count(query.shape[1], key.shape[1], valid)
        if slot is not None:
            scores = slot.widen(scores, self.prefix_length)
            row_count = torch.zeros(slot.batch_size, 1, 1, device=scores.device)
            row_count[slot.row] = count
            count = row_count
        if layer_idx not in self._scores:
            self._scores[layer_idx], self._counts[layer_idx] = scores, count
        elif self.reduction == "max":
            self._scores[layer_idx] = torch.maximum(self._scores[layer_idx], scores)
        else:
            self._scores[layer_idx] = self._scores[layer_idx] + scores
            self._counts[layer_idx] = self._counts[layer_idx] + count

    def copy(self) -> WindowCollector:
        """A collector that goes on from this one's scores: later calls add to the copy alone (scores
        are never changed in place, so the two share what they hold now)."""
        twin = WindowCollector(self.prefix_length, self.reduction)
        twin.num_queries, twin.query_valid, twin.slot = self.num_queries, self.query_valid, self.slot
        twin._scores, twin._counts = dict(self._scores), dict(self._counts)
        return twin

    def layer_scores(self) -> list[torch.Tensor]:
        """Per scored layer (full attention: sliding windows are not scored) [B, H_kv, prefix_length]
        float32 scores, in layer order (not yet pooled)."""
        layers = sorted(self._scores)
        if self.reduction == "max":
            return [self._scores[i] for i in layers]
        return [self._scores[i] / self._counts[i] for i in layers]


class SpanCollector(TimedCollector):
    """Scores one span of prompt columns per row and call, from a probe read after the prompt (KVzip's
    reconstruction): each probe query's softmax over the row's first `sink` entries, the span's entries and
    the probe's own (causal), read at the span's columns; the max (or mean) over a group's query heads and
    the probe's queries. `places`, set before each call: per row (span start, span end, probe length) in
    the row's own positions, or None for a row with no probe this call."""

    def __init__(self, prefix_length: int, pads: list[int], sink: int, reduction: Reduction = "max") -> None:
        super().__init__()
        self.prefix_length, self.pads, self.sink, self.reduction = prefix_length, pads, sink, reduction
        self.places: list[tuple[int, int, int] | None] = []
        self.scores: dict[int, torch.Tensor] = {}

    def start_call(self) -> None:
        """Each call scores the spans `places` names."""

    def score_last(self, num_queries: int, query_valid: torch.Tensor | None = None) -> None:
        """Every probe query counts (`places` gives each row's probe length)."""

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                scaling: float | None, softcap: float | None = None, sliding: bool = False) -> None:
        if sliding:  # a sliding window keeps its window: nothing to score
            return
        with self.timer.measure(query.device):
            width = key.shape[2] - query.shape[2]  # the prompt's columns; the probe's follow
            out = self.scores.get(layer_idx)
            if out is None:
                out = self.scores[layer_idx] = torch.zeros(len(self.pads), key.shape[1], self.prefix_length,
                                                           dtype=scoring.SCORE_DTYPE, device=query.device)
            for row, place in enumerate(self.places):
                if place is None:
                    continue
                start, end, length = place
                pad, sink = self.pads[row], min(self.sink, start)
                keys = torch.cat([key[row:row + 1, :, pad: pad + sink], key[row:row + 1, :, pad + start: pad + end],
                                  key[row:row + 1, :, width: width + length]], dim=2)
                scores = window_scores(query[row:row + 1, :, :length], keys, prefix_length=sink + end - start,
                                       scaling=scaling, reduction=self.reduction, softcap=softcap)[0, :, sink:]
                if self.reduction == "mean":
                    scores = scores / reduced_count(query.shape[1], key.shape[1], length)
                stop = min(pad + end, self.prefix_length)
                out[row, :, pad + start: stop] = scores[:, : max(stop - pad - start, 0)]

    def layer_scores(self) -> list[torch.Tensor]:
        return [self.scores[layer] for layer in sorted(self.scores)]


class PromptCollector(TimedCollector):
    """Prompt-stage scores from the draft: one score per prompt token (SpecPC, SpecPrefill).

    Every forward call is one step: the prefill (whose last `window` queries count, weighted
    linearly from 0 for the oldest to 1 for the newest when `weighted`), then each fed lookahead
    token. Within a step, attention over the `prompt_width` prompt keys is reduced over heads and
    queries, then over layers >= `start_layer`; steps are reduced at the end, over valid steps.
    """

    def __init__(self, prompt_width: int, window: int, start_layer: int = 0, weighted: bool = False,
                 head_reduction: Reduction = "max", layer_reduction: Reduction = "max") -> None:
        self.prompt_width = prompt_width
        self.window = window
        self.start_layer = start_layer
        self.weighted = weighted
        self.head_reduction = head_reduction
        self.layer_reduction = layer_reduction
        self.steps: list[torch.Tensor] = []  # per step [B, prompt_width]
        self._layers: dict[int, torch.Tensor] = {}  # this step's per-layer scores
        super().__init__()

    def start_call(self) -> None:
        if self.slot is None or self.slot.row == 0:  # the later rows of a row-by-row prefill add to its step
            self._close_step()

    def _close_step(self) -> None:
        if self._layers:
            stacked = torch.stack([self._layers[layer] for layer in sorted(self._layers)])
            self.steps.append(stacked.amax(0) if self.layer_reduction == "max" else stacked.mean(0))
            self._layers = {}

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                attention_mask: torch.Tensor | None, scaling: float | None, softcap: float | None = None,
                sliding: bool = False) -> None:
        if layer_idx < self.start_layer:
            return
        with self.timer.measure(query.device):
            self._observe(layer_idx, query, key, attention_mask, scaling, softcap)

    def _observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None, softcap: float | None) -> None:
        prefill = not self.steps
        num_queries = min(self.window, query.shape[2]) if prefill else query.shape[2]
        weight = None
        if prefill and self.weighted:
            weight = torch.linspace(0, 1, num_queries, dtype=scoring.SCORE_DTYPE,
                                    device=query.device).expand(query.shape[0], -1)
        allowed = allowed_rows(attention_mask, query.shape[2], num_queries, key.shape[2])
        scores = window_scores(query[:, :, -num_queries:], key,
                               prefix_length=self.slot.columns(self.prompt_width) if self.slot else self.prompt_width,
                               scaling=scaling, allowed=allowed, query_weight=weight, reduction=self.head_reduction,
                               softcap=softcap)
        if self.head_reduction == "max":
            scores = scores.amax(dim=1)
        else:
            total_weight = weight.sum(dim=1, keepdim=True) if weight is not None else num_queries
            scores = scores.sum(dim=1) / (query.shape[1] * total_weight)
        if self.slot is not None:  # one row of the prefill: the rows of a layer add up (each is zero elsewhere)
            scores = self.slot.widen(scores, self.prompt_width)
            scores = self._layers[layer_idx] + scores if layer_idx in self._layers else scores
        self._layers[layer_idx] = scores

    def token_scores(self, step_valid: torch.Tensor, step_reduction: Reduction = "max") -> torch.Tensor:
        """[B, prompt_width] scores, reduced over the valid steps (step_valid: [B, steps] bool)."""
        self._close_step()
        steps = torch.stack(self.steps, dim=1)[:, : step_valid.shape[1]]  # [B, steps, width]
        valid = step_valid[:, : steps.shape[1]].to(steps.dtype).unsqueeze(-1)
        if step_reduction == "max":
            return (steps * valid).amax(dim=1)
        return (steps * valid).sum(dim=1) / valid.sum(dim=1).clamp(min=1)


_WRAPPED = "draftkv_"  # our attention implementations: "draftkv_" + the model's own


def _own_attention(module: torch.nn.Module, implementation: str) -> Callable:
    """The model's own attention function: a registered kernel, or its modeling file's eager one."""
    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]
    return sys.modules[type(module).__module__].eager_attention_forward


def _capturing(implementation: str) -> Callable:
    """An attention function that scores for the active collectors, then runs the model's own."""

    def attention(module, query, key, value, attention_mask, **kwargs):
        ragged = _active_ragged.get()
        if ragged is not None and id(module) in ragged[1] and (layer := ragged[0].layers[module.layer_idx]).brings_mask:
            # A ragged layer: each KV head has its own real entries, so it brings its own mask.
            attention_mask = layer.mask(query.shape[2], query.shape[1] // key.shape[1])
            if attention_mask is not None and implementation != "sdpa":  # eager adds its mask to the logits
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device) \
                    .masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
        for collector in _active_collectors.get():
            collector.observe(module.layer_idx, query, key, attention_mask, kwargs.get("scaling"),
                              softcap=kwargs.get("softcap"), sliding=bool(kwargs.get("sliding_window")))
        if implementation == "sdpa" and id(module) in _few_queries.get() and stackable(module, query, attention_mask,
                                                                                        kwargs):
            return stacked_sdpa(module, query, key, value, attention_mask, **kwargs)
        return _own_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)

    return attention


def stackable(module: torch.nn.Module, query: torch.Tensor, attention_mask: torch.Tensor | None,
              kwargs: dict) -> bool:
    """Whether `stacked_sdpa` computes this call: one query, or a few masked ones (several unmasked queries
    are causal among themselves), of grouped heads, nothing else added."""
    queries = query.shape[2]
    return (getattr(module, "num_key_value_groups", 1) > 1 and queries <= FEW_QUERIES
            and (attention_mask is not None or queries == 1) and kwargs.get("position_bias") is None
            and kwargs.get("softcap") is None and not module.training)


def stacked_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float | None = None,
                 **_: object) -> tuple[torch.Tensor, None]:
    """SDPA over a few queries [B, H_q, q, d] with the query heads that share a KV head stacked as that
    head's queries [B, H_kv, group * q, d], and the mask [B, 1 or H_q, q, K] (None: one query, which sees
    every key) stacked the same way. transformers reads one query with SDPA's grouped-query path, which
    on a CPU is many times slower than this; for more it copies each KV head once per query head it
    serves (repeat_kv), which over a long cache costs more than the rest of the call."""
    batch, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    stacked = query.reshape(batch, kv_heads, heads // kv_heads * queries, dim)
    mask = None if attention_mask is None else \
        attention_mask.expand(batch, heads, queries, -1).reshape(batch, kv_heads, stacked.shape[2], -1)
    output = F.scaled_dot_product_attention(stacked, key, value, attn_mask=mask, scale=scaling)
    return output.reshape(batch, heads, queries, value.shape[-1]).transpose(1, 2).contiguous(), None


@contextmanager
def few_queries(model: torch.nn.Module) -> Iterator[None]:
    """The model reads a few tokens per call over a long cache for the block (speculation): its SDPA
    layers stack grouped query heads (`stacked_sdpa`) instead of copying their keys and values."""
    if own_implementation(model) != "sdpa":
        yield
        return
    with _wrapped(model, _few_queries, _few_queries.get() | _attention_modules(model)):
        yield


def own_implementation(model: torch.nn.Module) -> str:
    """The model's own attention implementation, whether or not ours wraps it now."""
    return (model.config._attn_implementation or "eager").removeprefix(_WRAPPED)


def wrapped_implementation(model: torch.nn.Module) -> tuple[str, str]:
    """The model's attention implementation now, and ours that wraps it (registered on first use)."""
    previous = model.config._attn_implementation or "eager"
    own = previous.removeprefix(_WRAPPED)
    name = _WRAPPED + own
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _capturing(own))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS.get(own, sdpa_mask))
    return previous, name


@contextmanager
def _wrapped(model: torch.nn.Module, variable: contextvars.ContextVar, value: object) -> Iterator[None]:
    """Run `model` through our attention wrapper with `variable` set to `value` for the block; both as
    they were afterwards."""
    previous, wrapped = wrapped_implementation(model)
    model.set_attn_implementation(wrapped)
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)
        model.set_attn_implementation(previous)


def _attention_modules(model: torch.nn.Module) -> frozenset[int]:
    """The ids of the model's attention modules (those that know their layer)."""
    return frozenset(id(module) for module in model.modules() if hasattr(module, "layer_idx"))


@contextmanager
def capture(model: torch.nn.Module, *collectors: Collector | None) -> Iterator[None]:
    """Run `model` with window-query capture into the collectors for the duration of the block."""
    active = tuple(c for c in collectors if c is not None)
    if not active:
        yield
        return

    def start_calls(*_: object) -> None:  # a pre-hook must return None, or it replaces the inputs
        for collector in active:
            collector.start_call()

    with _wrapped(model, _active_collectors, active):
        hook = model.register_forward_pre_hook(start_calls)
        try:
            yield
        finally:
            hook.remove()


def follow_ragged(old: DynamicCache, new: DynamicCache) -> None:
    """The decode goes on over `new` (the rows of `old` still running): its layers bring the masks now."""
    active = _active_ragged.get()
    if active is not None and active[0] is old:
        _active_ragged.set((new, active[1]))


@contextmanager
def ragged_attention(model: torch.nn.Module, cache: DynamicCache) -> Iterator[None]:
    """Decode over a ragged cache: its layers' per-head masks replace the model's (none needed then)."""
    if not any(layer.brings_mask for layer in cache.layers):
        yield
        return
    with _wrapped(model, _active_ragged, (cache, _attention_modules(model))):
        yield
