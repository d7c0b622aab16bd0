"""The compressed KV cache: a transformers DynamicCache whose layers hold only kept entries.

One layer class per layout, behind transformers' cache-layer interface (update, crop, seq length):
`SlotLayer` (uniform: every head keeps the same entries), `PaddedLayer` (ragged, padded to the longest
head and masked), `PerHeadLayer` (ragged, every head stored exactly), `WindowLayer` (a sliding window)
and `FixedSlotLayer` (the static decode step's). Every layer of a cache the flow makes is one of them
(`new_cache`), and each knows how to copy itself, keep some entries, give some batch rows, list its
entries, count its bytes, checkpoint itself and bring its own mask: a new layer kind is one class.
`SlotLayer` and `PaddedLayer` have preallocated room that decoding writes into in place (`reserve`).

Entries keep the RoPE of their original positions (keys are cached after RoPE), so decoding goes
on at the logical position n, n+1, ... while the physical cache holds fewer entries. The decode
loop passes explicit `position_ids` (logical) and an attention mask as long as the physical cache.

When layers (PyramidKV) or KV heads (Ada-KV) keep different numbers of entries, the cache is
ragged. Two layouts hold it, chosen by measurement (see the README): `PaddedLayer` pads each layer
to its longest head and masks the empty slots; `PerHeadLayer` stores every head exactly and pads
only a transient copy per decoding step. Either way the attention function reads the layer's own
per-head mask (attention.ragged_attention).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class SlotLayer(DynamicLayer):
    """A uniform layer with preallocated room: new entries are written into free slots in place and the
    model reads a view of the filled ones, so a decoding step copies nothing that is already cached
    (transformers' DynamicLayer concatenates the whole layer every step). Empty until its first update."""

    brings_mask = False  # the model's own attention mask applies (a row mask for a padded batch)

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, room: int = 0) -> None:
        super().__init__()
        if keys is not None:
            self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
            self._place(keys, values, room)

    def _place(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        """Copy the entries into new slots with `room` free after them."""
        batch, heads, length = keys.shape[:3]
        self.key_slots = keys.new_empty(batch, heads, length + room, keys.shape[-1])
        self.value_slots = values.new_empty(batch, heads, length + room, values.shape[-1])
        self.key_slots[:, :, :length].copy_(keys)
        self.value_slots[:, :, :length].copy_(values)
        self.filled = length
        self._show()

    def _show(self) -> None:
        self.keys = self.key_slots[:, :, : self.filled]
        self.values = self.value_slots[:, :, : self.filled]

    @property
    def capacity(self) -> int:
        return self.key_slots.shape[2]

    def reserve(self, room: int) -> None:
        """Make room for `room` more entries (one copy, only when there is too little)."""
        if self.is_initialized and self.filled + room > self.capacity:
            self._place(self.keys, self.values, room)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self._place(key_states, value_states, 0)
            return self.keys, self.values
        new = key_states.shape[2]
        self.reserve(max(new, self.filled) if self.filled + new > self.capacity else 0)
        self.key_slots[:, :, self.filled: self.filled + new].copy_(key_states)
        self.value_slots[:, :, self.filled: self.filled + new].copy_(value_states)
        self.filled += new
        self._show()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0:
            self.filled = max(self.filled + tokens_to_remove, 0)
            self._show()

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Add entries [B, H_kv, J, d] after the held ones; `valid` [B, J] marks the real ones (here the
        batch's row mask must hide the others: see cache.append_entries)."""
        self.update(keys, values)

    def gathered(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values at `index` ([B, H_kv, K]), in order."""
        gather = index.to(self.keys.device)[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        return self.keys.gather(2, gather), self.values.gather(2, gather)

    def keep(self, index: torch.Tensor, room: int = 0) -> None:
        """Keep only the entries at `index` ([B, H_kv, K]), in order, with `room` free slots after them."""
        keys, values = self.gathered(index)
        if room:
            self._place(keys, values, room)
        else:
            self._hold(keys, values)

    def _hold(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Make `keys` and `values` the slots themselves (no copy, no room)."""
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.key_slots, self.value_slots, self.filled = keys, values, keys.shape[2]
        self._show()

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> SlotLayer:
        """A layer whose slots are `keys` and `values` themselves."""
        layer = cls()
        layer._hold(keys, values)
        return layer

    def copy(self) -> SlotLayer:
        """A copy with its own tensors."""
        return SlotLayer(self.keys, self.values)

    def rows(self, rows: torch.Tensor, room: int, trim: bool = False) -> SlotLayer:
        """A copy holding only the batch rows `rows`, with room for `room` more entries (`trim`: see PaddedLayer)."""
        return SlotLayer(self.keys[rows], self.values[rows], room)

    def entries(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values [B, H_kv, K, d] and which slots hold a real entry [B, H_kv, K]: here the batch's row
        mask ([B, K], None: all real)."""
        batch, heads, length = self.keys.shape[:3]
        if attention_mask is None:
            valid = torch.ones(batch, heads, length, dtype=torch.bool, device=self.keys.device)
        else:
            valid = attention_mask.bool()[:, None, :].expand(batch, heads, length)
        return self.keys, self.values, valid

    def storage_bytes(self) -> int:
        """Bytes of the entries held (a ragged layer's padding included)."""
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def checkpoint(self) -> Callable[[], None]:
        """A way back to the layer as it is now, copying nothing (updates write past the filled slots)."""
        filled = self.filled

        def restore() -> None:
            self.filled = filled
            self._show()

        return restore

    def mask(self, num_queries: int, group: int) -> torch.Tensor | None:
        """The layer's own per-head mask [B, H_q, q, K], for layers that bring one (`brings_mask`)."""
        return None


class WindowLayer(DynamicSlidingWindowLayer):
    """transformers' sliding-window layer (it keeps its last window of entries), with the behaviour the
    flow asks of every layer. A KV budget does not apply to it: it keeps its window."""

    brings_mask = False

    def reserve(self, room: int) -> None:
        """Nothing to reserve: the window rolls."""

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        if not bool(valid.all()):
            raise RuntimeError("a sliding window cannot hide some rows' entries: its batch decodes one row at a time")
        self.update(keys, values)

    def copy(self) -> WindowLayer:
        copied = copy.copy(self)  # its counters too
        if self.is_initialized:
            copied.keys, copied.values = self.keys.clone(), self.values.clone()
        return copied

    def rows(self, rows: torch.Tensor, room: int, trim: bool = False) -> WindowLayer:
        copied = copy.copy(self)  # its counters hold for every row
        if self.is_initialized:
            copied.keys, copied.values = self.keys[rows], self.values[rows]
        return copied

    def storage_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def checkpoint(self) -> Callable[[], None]:
        """Updates make new tensors, so keeping the present ones by reference also brings back what the
        window lets go of."""
        keys, values, cumulative = self.keys, self.values, self.cumulative_length

        def restore() -> None:
            self.keys, self.values, self.cumulative_length = keys, values, cumulative

        return restore

    def mask(self, num_queries: int, group: int) -> torch.Tensor | None:
        return None


def ragged_mask(valid: torch.Tensor, num_queries: int, group: int) -> torch.Tensor:
    """[B, H_q, q, K] bool from a ragged layer's real entries `valid` [B, H_kv, K]: each head sees its
    own, causal among the last q (new) ones."""
    valid = valid.repeat_interleave(group, dim=1)[:, :, None, :].expand(-1, -1, num_queries, -1)
    if num_queries == 1:
        return valid
    length = valid.shape[-1]
    causal = torch.ones(num_queries, length, dtype=torch.bool, device=valid.device).tril(length - num_queries)
    return valid & causal


def _first_used_slot(valid: torch.Tensor) -> int:
    """The first slot that some row and head of `valid` [B, H_kv, K] uses: the slots before it are
    padding that a wider row, now gone, needed."""
    used = valid.any(dim=1).any(dim=0).nonzero()
    return int(used[0]) if used.numel() else 0


class PaddedLayer(SlotLayer):
    """Keys and values [B, H_kv, K, d] padded to the longest head; `valid` [B, H_kv, K] marks real
    entries. Empty slots come first, so new tokens append at the end of every head."""

    brings_mask = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor, room: int = 0) -> None:
        self.full = bool(valid.all())  # no empty slot: a decoding step needs no mask (and gets the flash kernel)
        self._valid = valid
        super().__init__(keys, values, room)

    def _place(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        valid = self._valid
        self.valid_slots = valid.new_ones(*valid.shape[:2], valid.shape[2] + room)
        self.valid_slots[:, :, : valid.shape[2]].copy_(valid)
        super()._place(keys, values, room)

    def _show(self) -> None:
        super()._show()
        self._valid = self.valid_slots[:, :, : self.filled]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # The new entries' slots are marked real already (free slots are made True).
        return super().update(key_states, value_states)

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        self.update(keys, values)
        self.valid_slots[:, :, self.filled - keys.shape[2]: self.filled] = valid[:, None, :].to(self.valid_slots.device)
        self.full = self.full and bool(valid.all())

    def keep(self, index: torch.Tensor, room: int = 0) -> None:
        raise NotImplementedError("decode-time eviction keeps a uniform cache")

    def copy(self) -> PaddedLayer:
        return PaddedLayer(self.keys, self.values, self.valid)

    def rows(self, rows: torch.Tensor, room: int, trim: bool = False) -> PaddedLayer:
        """`trim`: also drop the leading slots that none of these rows uses (safe only where the layers bring
        their own masks, not under a batch-wide attention mask of the old width)."""
        valid = self.valid[rows]
        first = _first_used_slot(valid) if trim else 0  # sliced before the rows are gathered: no copy of the padding
        return PaddedLayer(self.keys[rows, :, first:], self.values[rows, :, first:], valid[:, :, first:], room)

    def entries(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.keys, self.values, self.valid

    def mask(self, num_queries: int, group: int) -> torch.Tensor | None:
        """The layer's per-head mask; None for a single new token when every slot is real."""
        if num_queries == 1 and self.full:
            return None
        return ragged_mask(self.valid, num_queries, group)


class PerHeadLayer(DynamicLayer):
    """Every (row, KV head) stored exactly; each step works on a transient padded copy."""

    full = False
    brings_mask = True

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        super().__init__()
        batch, heads = valid.shape[:2]
        self.head_keys = [[keys[b, h][valid[b, h]] for h in range(heads)] for b in range(batch)]
        self.head_values = [[values[b, h][valid[b, h]] for h in range(heads)] for b in range(batch)]
        self.valid = valid
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys = self.values = None  # no padded copy between steps

    def _padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor([[k.shape[0] for k in row] for row in self.head_keys])
        width = int(lengths.max())
        batch, heads = lengths.shape
        head_dim = self.head_keys[0][0].shape[-1]
        keys = self.head_keys[0][0].new_zeros(batch, heads, width, head_dim)
        values = self.head_values[0][0].new_zeros(batch, heads, width, self.head_values[0][0].shape[-1])
        for b in range(batch):
            for h in range(heads):
                keys[b, h, width - lengths[b, h]:] = self.head_keys[b][h]
                values[b, h, width - lengths[b, h]:] = self.head_values[b][h]
        self.valid = torch.arange(width)[None, None, :] >= (width - lengths)[..., None]
        self.valid = self.valid.to(keys.device)
        return keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        for b, row in enumerate(self.head_keys):
            for h in range(len(row)):
                row[h] = torch.cat([row[h], key_states[b, h]])
                self.head_values[b][h] = torch.cat([self.head_values[b][h], value_states[b, h]])
        return self._padded()

    def append(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        for b, (row_keys, row_values) in enumerate(zip(self.head_keys, self.head_values, strict=True)):
            real = valid[b].to(keys.device)
            for h in range(len(row_keys)):
                row_keys[h] = torch.cat([row_keys[h], keys[b, h][real]])
                row_values[h] = torch.cat([row_values[h], values[b, h][real]])
        self._padded()  # its mask follows

    def crop(self, tokens_to_remove: int) -> None:
        for row_keys, row_values in zip(self.head_keys, self.head_values, strict=True):
            for h in range(len(row_keys)):
                row_keys[h], row_values[h] = row_keys[h][:tokens_to_remove], row_values[h][:tokens_to_remove]

    def get_seq_length(self) -> int:
        return max(k.shape[0] for row in self.head_keys for k in row)

    def reserve(self, room: int) -> None:
        """Nothing to reserve: each step makes its own padded copy."""

    def copy(self) -> PerHeadLayer:
        copied = copy.copy(self)
        copied.head_keys = [[keys.clone() for keys in row] for row in self.head_keys]
        copied.head_values = [[values.clone() for values in row] for row in self.head_values]
        return copied

    def rows(self, rows: torch.Tensor, room: int, trim: bool = False) -> PerHeadLayer:
        chosen = rows.tolist()
        copied = copy.copy(self)
        copied.head_keys = [self.head_keys[b] for b in chosen]
        copied.head_values = [self.head_values[b] for b in chosen]
        copied.valid = self.valid[rows]
        return copied

    def entries(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keys, values = self._padded()
        return keys, values, self.valid

    def storage_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for row_k, row_v in zip(self.head_keys, self.head_values, strict=True)
                   for k, v in zip(row_k, row_v, strict=True))

    def checkpoint(self) -> Callable[[], None]:
        lengths = [[len(keys) for keys in row] for row in self.head_keys]

        def restore() -> None:
            for row_keys, row_values, row_lengths in zip(self.head_keys, self.head_values, lengths, strict=True):
                for head, length in enumerate(row_lengths):
                    row_keys[head], row_values[head] = row_keys[head][:length], row_values[head][:length]

        return restore

    def mask(self, num_queries: int, group: int) -> torch.Tensor:
        return ragged_mask(self.valid, num_queries, group)


class FixedSlotLayer(DynamicLayer):
    """A layer of fixed shape for the static decode step: keys and values [B, H_kv, C, d] over all C
    slots, real entries marked in `valid` [B, H_kv, C], and each new token written at slot
    `base + step` of every row, where `step` is a device tensor shared by the layers. Shapes and
    addresses never change, so a step can be captured once and replayed (a CUDA graph)."""

    full = False
    brings_mask = True

    def __init__(self, capacity: int, keys: torch.Tensor, values: torch.Tensor, step: torch.Tensor) -> None:
        super().__init__()
        batch, heads, _, head_dim = keys.shape
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        self.keys = keys.new_zeros(batch, heads, capacity, head_dim)
        self.values = values.new_zeros(batch, heads, capacity, values.shape[-1])
        self.valid = torch.zeros(batch, heads, capacity, dtype=torch.bool, device=keys.device)
        self.step, self.base = step, 0

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def load(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """Put a request's entries in the first slots (in place) and free the rest."""
        length = keys.shape[2]
        self.keys[:, :, :length].copy_(keys)
        self.values[:, :, :length].copy_(values)
        self.valid.zero_()
        self.valid[:, :, :length].copy_(valid)
        self.base = length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        at = self.step + self.base
        if key_states.shape[2] > 1:  # several tokens (speculation's check): consecutive slots
            at = at + torch.arange(key_states.shape[2], device=self.device)
        self.keys.index_copy_(2, at, key_states)
        self.values.index_copy_(2, at, value_states)
        self.valid.index_fill_(2, at, True)
        return self.keys, self.values

    def free_rows(self, counts: torch.Tensor) -> None:
        """Free the last `counts[b]` slots written of each row b, the slots kept as they are."""
        filled = self.filled
        slots = torch.arange(self.capacity, device=self.device)
        freed = (slots[None, :] >= filled - counts[:, None]) & (slots[None, :] < filled)
        self.valid &= ~freed[:, None, :]

    def forget(self, count: int) -> None:
        """Free the last `count` slots written (refused proposals); the caller moves `step` back."""
        filled = self.filled
        self.valid[:, :, filled - count:filled] = False

    def get_seq_length(self) -> int:
        return self.capacity

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.capacity, 0

    @property
    def filled(self) -> int:
        return self.base + int(self.step)

    def entries(self, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        filled = self.filled
        return self.keys[:, :, :filled], self.values[:, :, :filled], self.valid[:, :, :filled]

    def rows(self, rows: torch.Tensor, room: int, trim: bool = False) -> PaddedLayer:
        """The filled slots of the batch rows `rows` as a padded layer (see PaddedLayer.rows)."""
        keys, values, valid = self.entries(None)
        valid = valid[rows]
        first = _first_used_slot(valid) if trim else 0
        return PaddedLayer(keys[rows, :, first:], values[rows, :, first:], valid[:, :, first:], room)

    def storage_bytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    def mask(self, num_queries: int, group: int) -> torch.Tensor:
        if num_queries == 1:
            return ragged_mask(self.valid, num_queries, group)
        # The new tokens' slots (written from `base + step` on) are not the last ones: query i sees the
        # slots up to its own.
        newest = self.step + self.base + torch.arange(num_queries, device=self.device)
        seen = torch.arange(self.capacity, device=self.device)[None, :] <= newest[:, None]
        return ragged_mask(self.valid, 1, group).expand(-1, -1, num_queries, -1) & seen


def new_cache(config) -> DynamicCache:
    """An empty cache for a model of `config` whose layers are ours: a sliding window where the model
    has one (its `is_sliding` layers), a slot layer everywhere else."""
    cache = DynamicCache(config=config.get_text_config())
    cache.layers = [WindowLayer(layer.sliding_window) if layer.is_sliding else SlotLayer() for layer in cache.layers]
    return cache


def reserve(cache: DynamicCache, room: int) -> None:
    """Give every layer room for `room` more entries, written in place (one copy a layer, at most)."""
    for layer in cache.layers:
        layer.reserve(room)


LAYOUTS = {"padded": PaddedLayer, "per-head": PerHeadLayer}


def compressed_layers(cache: DynamicCache) -> list[int]:
    """The layers a KV budget applies to: full attention. A sliding-window layer already holds at most
    its window, so it keeps its window."""
    return [index for index, layer in enumerate(cache.layers) if not layer.is_sliding]


def clone_cache(cache: DynamicCache) -> DynamicCache:
    """A copy of the whole cache (dense's own, while other consumers still read the prefill's)."""
    return cache_of_layers([layer.copy() for layer in cache.layers])


def cache_of_layers(layers: list[DynamicLayer]) -> DynamicCache:
    cache = DynamicCache()
    cache.layers = layers
    return cache


def _uncompressed_copies(cache: DynamicCache) -> list[DynamicLayer | None]:
    """Copies of the layers a budget does not apply to (sliding windows); None where one does."""
    compressed = set(compressed_layers(cache))
    return [None if at in compressed else layer.copy() for at, layer in enumerate(cache.layers)]


def ragged_cache(cache: DynamicCache, index: list[torch.Tensor], valid: list[torch.Tensor],
                 layout: str = "padded") -> DynamicCache:
    """A ragged cache of the entries at `index[l]` ([B, H_kv, K_l]) where `valid[l]` is True, for each
    compressed layer l; the other layers are copied as they are."""
    layers = _uncompressed_copies(cache)
    for at, layer_index, layer_valid in zip(compressed_layers(cache), index, valid, strict=True):
        keys, values = cache.layers[at].gathered(layer_index)
        # A layer with no empty slot (PyramidKV's, one row at a time) has nothing to store per head:
        # padded, it holds the same bytes without a per-head copy each step (H100: 24 vs 37 ms per token).
        kind = PaddedLayer if bool(layer_valid.all()) else LAYOUTS[layout]
        layers[at] = kind(keys, values, layer_valid.to(keys.device))
    return cache_of_layers(layers)


def select_rows(cache: DynamicCache, rows: torch.Tensor, room: int, trim: bool = False) -> DynamicCache:
    """A new cache of the batch rows `rows` (the others are dropped: finished rows of a decode); `trim`:
    see PaddedLayer.rows."""
    return cache_of_layers([layer.rows(rows, room, trim) for layer in cache.layers])


def stacked_cache(caches: list[DynamicCache], attention_masks: list[torch.Tensor | None]) -> DynamicCache:
    """One cache holding every cache's rows in turn (full-attention layers only): per layer, each row's
    entries left-padded to the widest and masked per head, so each row decodes over its own entries,
    at its own positions, exactly as it would alone up to float arithmetic over the padding."""
    layers = []
    for at in range(len(caches[0].layers)):
        parts = [cache.layers[at].entries(mask) for cache, mask in zip(caches, attention_masks, strict=True)]
        width = max(keys.shape[2] for keys, _, _ in parts)
        keys = torch.cat([F.pad(keys, (0, 0, width - keys.shape[2], 0)) for keys, _, _ in parts])
        values = torch.cat([F.pad(values, (0, 0, width - values.shape[2], 0)) for _, values, _ in parts])
        valid = torch.cat([F.pad(valid, (width - valid.shape[2], 0), value=False) for _, _, valid in parts])
        layers.append(PaddedLayer(keys, values, valid))
    return cache_of_layers(layers)


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes held by the cache's key and value tensors (ragged layers: their storage, padding included)."""
    return sum(layer.storage_bytes() for layer in cache.layers)


def layer_entry_bytes(layer: DynamicLayer) -> int:
    """Bytes of one position's keys and values in one layer, over its KV heads (batch row 1)."""
    _, heads, _, head_dim = layer.keys.shape
    return heads * head_dim * (layer.keys.element_size() + layer.values.element_size())


def bytes_per_entry(cache: DynamicCache) -> int:
    """Bytes of one position's keys and values over the compressed layers and their KV heads (batch row 1)."""
    return sum(layer_entry_bytes(cache.layers[at]) for at in compressed_layers(cache))


def checkpoint(cache: DynamicCache) -> Callable[[], None]:
    """A way back to the cache as it is now (before a probe, or a question and its answer), copying
    nothing: each layer keeps its own way back."""
    layers = list(cache.layers)  # a decode may put other layers in their place
    restores = [layer.checkpoint() for layer in layers]

    def restore() -> None:
        cache.layers[:] = layers
        for layer_restore in restores:
            layer_restore()

    return restore


def newest_entries(cache: DynamicCache, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copies of every layer's last `count` entries (a guess just read), [B, H_kv, count, d] each; fewer where
    a sliding window holds fewer (then every layer gives as many as the smallest holds)."""
    count = min([count] + [layer.keys.shape[2] for layer in cache.layers])
    return [(layer.keys[:, :, layer.keys.shape[2] - count:].clone(),
             layer.values[:, :, layer.values.shape[2] - count:].clone()) for layer in cache.layers]


def append_entries(cache: DynamicCache, entries: list[tuple[torch.Tensor, torch.Tensor]], valid: torch.Tensor,
                   attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Add entries [B, H_kv, J, d] to every layer after the held ones (the tokens a decode starts with);
    `valid` [B, J] marks each row's real ones. Returns the batch's row mask over the longer cache (None
    when no row has padding): layers that bring their own masks mark the real entries themselves."""
    for layer, (keys, values) in zip(cache.layers, entries, strict=True):
        layer.append(keys, values, valid)
    full = [cache.layers[at] for at in compressed_layers(cache)]
    if attention_mask is None and (bool(valid.all()) or all(layer.brings_mask for layer in full)):
        return None
    if attention_mask is None:
        attention_mask = valid.new_ones(valid.shape[0], full[0].keys.shape[2] - valid.shape[1], dtype=torch.long)
    return torch.cat([attention_mask, valid.to(attention_mask)], dim=1)


def gather_positions(cache: DynamicCache, kept_per_layer: list[torch.Tensor], keep_capacity: bool = False) -> None:
    """Keep, in every compressed layer, the entries at `kept_per_layer[l]` ([B, H_kv, K] indices), in place;
    `keep_capacity`: with the free slots a decode reserved (decode-time eviction)."""
    for at, kept in zip(compressed_layers(cache), kept_per_layer, strict=True):
        layer = cache.layers[at]
        layer.keep(kept, layer.capacity - kept.shape[-1] if keep_capacity else 0)


def gathered_copy(cache: DynamicCache, kept_per_layer: list[torch.Tensor]) -> DynamicCache:
    """A new cache holding only the entries at `kept_per_layer` ([B, H_kv, K] per compressed layer), the
    other layers copied as they are; `cache` is kept."""
    layers = _uncompressed_copies(cache)
    for at, kept in zip(compressed_layers(cache), kept_per_layer, strict=True):
        layers[at] = SlotLayer.holding(*cache.layers[at].gathered(kept))
    return cache_of_layers(layers)
