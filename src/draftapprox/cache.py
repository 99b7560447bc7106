"""Compressed KV caches built from per-layer keep masks.

A KV method answers, for every layer, a boolean mask `(batch, kv_heads, n)` of prompt positions to keep. When every
head of a layer keeps the same number of positions (StreamingLLM, SnapKV, PyramidKV, SpecKV) the layer becomes an
ordinary contiguous `DynamicLayer` of that length, so decoding runs the model's own kernel and its cost follows the
budget. When heads keep different numbers (AdaKV, Ada-SpecKV) the layer becomes a `HeadwiseLayer`, which really
holds only the kept pairs in a flattened layout instead of masking evicted ones.
Kept keys keep their original RoPE rotation; callers pass explicit position ids when decoding.
`batch_caches` stacks several sequences' caches (any mix of the two kinds) into `BatchLayer`s, so that they decode
together: one pass over the weights per step serves every sequence.
Every layer appends in place (`_Appending`): its keys and values are views of a larger buffer, so a decode step
writes one position instead of copying the whole cache, and `reserve` sizes the buffers once for a generation.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import CacheLayerMixin, DynamicLayer

GROWTH = 64
"""Positions a buffer grows by at least when it must grow without a `reserve` (chunked prefills, lookaheads); a
growth is also at least half the current length, so appends stay amortised O(1)."""


class _Appending:
    """In-place appends for a layer's `keys`/`values` `(b, g, t, d)`: they are views of the first `t` positions of
    buffers with spare room, so an append copies only the new positions: torch.cat per layer per decode step
    copies the whole cache, a cost that grows with it. A layer whose tensors were assigned from
    outside (a shallow copy, a batch selection, a gather) gives up its buffers and copies into new ones on its next
    append, so two caches never write into the same storage."""

    _buffers: tuple[torch.Tensor, torch.Tensor] | None = None
    _views: tuple[torch.Tensor, torch.Tensor] | None = None  # the views last handed out: still ours if unchanged

    def _owned(self) -> bool:
        return self._views is not None and self.keys is self._views[0] and self.values is self._views[1]

    def _expose(self, length: int) -> None:
        kb, vb = self._buffers
        self.keys, self.values = kb[:, :, :length], vb[:, :, :length]
        self._views = (self.keys, self.values)

    def _grow(self, capacity: int) -> None:
        b, g, t, d = self.keys.shape
        buffers = (self.keys.new_empty(b, g, capacity, d), self.values.new_empty(b, g, capacity, d))
        buffers[0][:, :, :t], buffers[1][:, :, :t] = self.keys, self.values
        self._buffers = buffers
        self._expose(t)

    def capacity(self) -> int:
        """Positions this layer can hold without copying (its length, if it holds no buffers of its own)."""
        return self._buffers[0].shape[2] if self._owned() else self.keys.shape[2]

    def reserve(self, extra: int) -> None:
        """Room for `extra` more positions without another copy."""
        if self.capacity() < self.keys.shape[2] + extra:
            self._grow(self.keys.shape[2] + extra)

    def _append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t, new = self.keys.shape[2], keys.shape[2]
        if keys.shape[:2] != self.keys.shape[:2] or keys.shape[3] != self.keys.shape[3]:
            # torch.cat would refuse too; a slice assignment would broadcast a single sequence into all of them
            raise ValueError(f"cannot append keys of shape {tuple(keys.shape)} to a cache layer of "
                             f"{tuple(self.keys.shape)}")
        if not self._owned() or self.capacity() < t + new:
            self._grow(t + new + max(GROWTH, (t + new) // 2))
        kb, vb = self._buffers
        kb[:, :, t:t + new], vb[:, :, t:t + new] = keys, values
        self._expose(t + new)
        return self.keys, self.values

    def truncate(self, length: int) -> None:
        """Drop positions from `length` on. The buffers are given up, so that a shallow copy taken at a greater
        length never sees its positions overwritten by later appends here."""
        self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]
        self._buffers = self._views = None

    def rewind(self, count: int) -> None:
        """Drop the newest `count` positions and keep the buffers, so the next append writes over them in place:
        how speculative decoding takes back the tokens the target rejected. Only for a cache nobody else holds
        views of (a decoding sequence's own); `truncate` is the safe kind."""
        length = self.keys.shape[2] - count
        if count < 0 or length < 0:
            raise ValueError(f"cannot rewind {count} of {self.keys.shape[2]} positions")
        if self._owned():
            self._expose(length)
        else:
            self.keys, self.values = self.keys[:, :, :length], self.values[:, :, :length]


class DenseLayer(_Appending, DynamicLayer):
    """transformers' `DynamicLayer`, appending in place."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, g, _, d = key_states.shape
        self.keys, self.values = key_states.new_empty(b, g, 0, d), value_states.new_empty(b, g, 0, d)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        return self._append(key_states, value_states)


def new_cache() -> DynamicCache:
    """An empty cache whose layers append in place; what every prefill starts from."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = DenseLayer
    return cache


def reserve(cache: DynamicCache, extra: int) -> None:
    """Room in every layer for `extra` more positions, so the decode loop never copies the cache."""
    for layer in cache.layers:
        layer.reserve(extra)


def _dense_layer(keys: torch.Tensor, values: torch.Tensor) -> DenseLayer:
    layer = DenseLayer()
    layer.lazy_initialization(keys, values)
    layer.keys, layer.values = keys, values
    return layer


class _TailLayer(_Appending, CacheLayerMixin):
    """A compressed prompt part that a subclass lays out and attends to itself (`attend`), plus a dense tail
    `(batch, kv_heads, t, d)` of the tokens decoded since, appended to every head."""

    is_compileable = False
    is_sliding = False

    def _start_tail(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        b, g, _, d = keys.shape
        self.keys, self.values = keys.new_empty(b, g, 0, d), values.new_empty(b, g, 0, d)
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._append(key_states, value_states)

    def get_mask_sizes(self, query: int | torch.Tensor) -> tuple[int, int]:
        # the query's length from transformers >= 5.3, its cache positions before
        q = query.shape[0] if isinstance(query, torch.Tensor) else query
        return self.get_seq_length() + q, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # get_max_length's name in earlier 5.x releases (abstract there)
        return -1


class HeadwiseLayer(_TailLayer):
    """A cache layer whose KV heads hold different numbers of prompt pairs.

    The compressed prompt part is stored flat: `prefix_keys[t]` belongs to the flattened (batch, kv_head) segment
    `segment[t]`, so memory is exactly the number of kept pairs. Tokens decoded afterwards go to every head and are
    kept in a dense `(batch, kv_heads, t, d)` tail. Attention over both is computed in `attend`, which the capture
    wrapper calls instead of the model's kernel.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, keep: torch.Tensor):
        super().__init__()
        b, g, n, d = keys.shape
        flat = keep.reshape(b * g, n)
        self.batch, self.heads, self.head_dim = b, g, d
        self.segment = flat.nonzero(as_tuple=True)[0]
        self.prefix_keys = keys.reshape(b * g, n, d)[flat]
        self.prefix_values = values.reshape(b * g, n, d)[flat]
        self.head_lengths = flat.sum(-1).view(b, g)
        self._start_tail(keys, values)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float):
        """Attention of `query (b, H, q, d)` over the ragged prefix and the causal dense tail `key/value`."""
        b, h, q, d = query.shape
        g, t = self.heads, key.shape[2]
        rows = query.reshape(b * g, (h // g) * q, d)
        prefix = (rows @ self.prefix_keys.T) * scaling  # (b*g, rows, T): one matmul over all heads' pairs
        foreign = self.segment[None, :] != torch.arange(b * g, device=query.device)[:, None]
        prefix = prefix.masked_fill(foreign[:, None, :], float("-inf"))
        tail = (rows @ key.reshape(b * g, t, d).transpose(1, 2)) * scaling
        positions = torch.arange(q, device=query.device)
        causal = torch.arange(t, device=query.device)[None, :] > (t - q + positions)[:, None]
        tail = tail.view(b * g, h // g, q, t).masked_fill(causal, float("-inf")).view(b * g, (h // g) * q, t)
        probs = torch.cat([prefix, tail], dim=-1).float().softmax(-1).to(query.dtype)
        prefix_probs, tail_probs = probs.split([prefix.shape[-1], t], dim=-1)
        out = prefix_probs @ self.prefix_values + tail_probs @ value.reshape(b * g, t, d)
        out = out.view(b, h, q, d).transpose(1, 2).contiguous()
        return out, None

    def get_seq_length(self) -> int:
        return int(self.head_lengths.max()) + self.keys.shape[-2]

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.prefix_keys, self.prefix_values, self.keys,
                                                          self.values))


class BatchLayer(_TailLayer):
    """One layer of several sequences decoded together: every (sequence, KV head) keeps its own prompt pairs,
    padded to the longest with a validity mask, plus a dense tail of the tokens decoded since, which all sequences
    share in length. A sequence's tail may have holes (`forget`): speculative decoding feeds every sequence the
    same number of tokens and takes back, per sequence, those its target rejected. Single-query attention only
    (decoding; a speculative check attends one query at a time); `attend` replaces the model's kernel.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values, self.valid = keys, values, valid
        self.tail_valid: torch.Tensor | None = None  # `(b, t)` once a position was forgotten; None: all valid
        self._start_tail(keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.tail_valid is not None:
            new = self.tail_valid.new_ones(self.tail_valid.shape[0], key_states.shape[2])
            self.tail_valid = torch.cat([self.tail_valid, new], dim=1)
        return self._append(key_states, value_states)

    def forget(self, row: int, count: int) -> None:
        """Mark sequence `row`'s newest `count` tail positions as never written."""
        if count <= 0:
            return
        with torch.inference_mode():  # the mask grows inside forwards, which run in inference mode
            if self.tail_valid is None:
                self.tail_valid = torch.ones(self.keys.shape[:1] + self.keys.shape[2:3], dtype=torch.bool,
                                             device=self.keys.device)
            self.tail_valid[row, self.keys.shape[2] - count:] = False

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               tail_valid: torch.Tensor | None = None):
        """Single-query attention over the padded prompt part and the tail `key/value`; `tail_valid (t,)`, where
        given, masks tail positions not written yet (a `StaticLayer`'s)."""
        b, h, q, d = query.shape
        if q != 1:
            raise ValueError("a batch of compressed caches decodes one token per sequence at a time")
        g, t = self.prefix_keys.shape[1], key.shape[2]
        rows = query.view(b, g, h // g, d)  # a KV head's query heads are consecutive (repeat_kv's order)
        prefix = (rows @ self.prefix_keys.transpose(-1, -2)) * scaling
        prefix = prefix.masked_fill(~self.valid[:, :, None, :], float("-inf"))
        tail = (rows @ key.transpose(-1, -2)) * scaling
        hidden = None if tail_valid is None else ~tail_valid
        if self.tail_valid is not None:  # (b, 1, 1, t): holes differ by sequence (`t`: a check's row sees fewer)
            own = ~self.tail_valid[:, None, None, :t]
            hidden = own if hidden is None else hidden | own
        if hidden is not None:
            tail = tail.masked_fill(hidden, float("-inf"))
        probs = torch.cat([prefix, tail], dim=-1).float().softmax(-1).to(query.dtype)
        prefix_probs, tail_probs = probs.split([prefix.shape[-1], tail.shape[-1]], dim=-1)
        out = prefix_probs @ self.prefix_values + tail_probs @ value
        return out.reshape(b, h, 1, d).transpose(1, 2).contiguous(), None

    def select(self, rows: torch.Tensor) -> None:
        """Keep only the sequences `rows` (the others finished)."""
        for name in ("prefix_keys", "prefix_values", "valid", "keys", "values", "tail_valid"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).index_select(0, rows))

    def holes(self) -> int:
        """Tail positions the sequence with the most valid ones does not use: what re-stacking would free."""
        if self.tail_valid is None:
            return 0
        return self.keys.shape[2] - int(self.tail_valid.sum(-1).max())

    def get_seq_length(self) -> int:
        return self.prefix_keys.shape[2] + self.keys.shape[2]


class StaticLayer(BatchLayer):
    """A `BatchLayer` whose every tensor keeps its shape and address while decoding, so that a decode step can be
    captured once as a CUDA graph and replayed (`static_decode`).

    The tail is a buffer of `capacity` positions written at `step`, a one-element tensor that every layer of a
    cache shares and the caller advances after each step; attention masks the positions not written yet. A
    graph replays whatever the step tensor holds, where a Python index would be frozen at capture time.
    """

    def __init__(self, layer: BatchLayer, capacity: int, step: torch.Tensor):
        keys = torch.cat([layer.prefix_keys, layer.keys], dim=2)  # tokens decoded before join the prompt part
        values = torch.cat([layer.prefix_values, layer.values], dim=2)
        tail = torch.ones(layer.keys.shape[:3], dtype=torch.bool, device=keys.device)
        if layer.tail_valid is not None:
            tail &= layer.tail_valid[:, None, :]
        super().__init__(keys, values, torch.cat([layer.valid, tail], dim=2))
        b, g, _, d = keys.shape
        self.keys, self.values = keys.new_zeros(b, g, capacity, d), values.new_zeros(b, g, capacity, d)
        self.step = step
        self._positions = torch.arange(capacity, device=keys.device)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.keys.index_copy_(2, self.step, key_states)
        self.values.index_copy_(2, self.step, value_states)
        return self.keys, self.values

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float,
               tail_valid: torch.Tensor | None = None):
        return super().attend(query, key, value, scaling, self._positions <= self.step)

    def reserve(self, extra: int) -> None:
        raise ValueError("a static cache layer holds a fixed number of positions")

    def written(self) -> BatchLayer:
        """The positions written so far as an ordinary `BatchLayer` (a copy): what decoding continues from once
        the batch changes shape."""
        step = int(self.step)
        out = BatchLayer(self.prefix_keys, self.prefix_values, self.valid)
        out.keys, out.values = self.keys[:, :, :step].clone(), self.values[:, :, :step].clone()
        return out

    def select(self, rows: torch.Tensor) -> None:
        raise ValueError("a static cache layer keeps its rows; take `written()` to select")


def _head_pairs(layer: CacheLayerMixin, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Sequence `row` of a layer as (keys, values) `(m_h, d)` per KV head, whatever its layout."""
    if isinstance(layer, BatchLayer):
        tail = slice(None) if layer.tail_valid is None else layer.tail_valid[row]
        return [(torch.cat([layer.prefix_keys[row, h][layer.valid[row, h]], layer.keys[row, h][tail]]),
                 torch.cat([layer.prefix_values[row, h][layer.valid[row, h]], layer.values[row, h][tail]]))
                for h in range(layer.prefix_keys.shape[1])]
    if isinstance(layer, HeadwiseLayer):
        if layer.batch != 1:
            raise ValueError("batch_caches stacks single-sequence caches or rows of batched ones")
        return [(torch.cat([layer.prefix_keys[layer.segment == h], layer.keys[0, h]]),
                 torch.cat([layer.prefix_values[layer.segment == h], layer.values[0, h]]))
                for h in range(layer.heads)]
    if layer.keys.shape[0] != 1:
        raise ValueError("batch_caches stacks single-sequence caches or rows of batched ones")
    return [(layer.keys[row, h], layer.values[row, h]) for h in range(layer.keys.shape[1])]


def batch_caches(caches: list[DynamicCache], rows: list[int] | None = None) -> DynamicCache:
    """Stack sequences of one model into one cache of `BatchLayer`s; each keeps exactly its own pairs.

    `caches[i]` is a single-sequence cache (contiguous, per-head or per-layer lengths, decoded tokens included), or
    a batch from an earlier call whose sequence `rows[i]` is taken: a running batch is re-stacked this way when a
    sequence joins it."""
    rows = rows or [0] * len(caches)
    out = DynamicCache()
    out.layers = []
    for layers in zip(*(c.layers for c in caches), strict=True):
        heads = [_head_pairs(layer, row) for layer, row in zip(layers, rows, strict=True)]
        longest = max(k.shape[0] for seq in heads for k, _ in seq)
        first = heads[0][0][0]
        shape = (len(heads), len(heads[0]), longest, first.shape[-1])
        keys, values = first.new_zeros(shape), first.new_zeros(shape)
        valid = torch.zeros(shape[:3], dtype=torch.bool, device=first.device)
        for i, seq in enumerate(heads):
            for h, (k, v) in enumerate(seq):
                keys[i, h, :k.shape[0]], values[i, h, :k.shape[0]], valid[i, h, :k.shape[0]] = k, v, True
        out.layers.append(BatchLayer(keys, values, valid))
    return out


def cache_length(cache: DynamicCache) -> int:
    """The most positions any layer and head holds: what a batch of caches is padded to."""
    return max(layer.get_seq_length() for layer in cache.layers)


def compress_cache(full: DynamicCache, keep: list[torch.Tensor]) -> DynamicCache:
    """A new cache holding, per layer, the positions of `keep[layer]` (b, G, n) of the first n cached positions.

    The full cache is not modified, so one prefill can serve several methods.
    """
    out = DynamicCache()
    out.layers = []
    for layer, mask in zip(full.layers, keep, strict=True):
        n = mask.shape[-1]
        keys, values = layer.keys[..., :n, :], layer.values[..., :n, :]
        mask = mask.to(keys.device)
        counts = mask.sum(-1)
        if bool((counts == counts.flatten()[0]).all()):
            k = int(counts.flatten()[0])
            # Kept positions in increasing order: a stable sort puts the True entries first, in position order.
            idx = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[..., :k]
            gather = idx[..., None].expand(-1, -1, -1, keys.shape[-1])
            out.layers.append(_dense_layer(keys.gather(2, gather), values.gather(2, gather)))
        else:
            out.layers.append(HeadwiseLayer(keys, values, mask))
    return out


def shallow_copy(cache: DynamicCache) -> DynamicCache:
    """A cache sharing the tensors of `cache`; appending to it (into buffers of its own) leaves the original
    untouched."""
    out = DynamicCache()
    out.layers = [_dense_layer(layer.keys, layer.values) for layer in cache.layers]
    return out


def truncate_cache(cache: DynamicCache, length: int) -> None:
    """Drop cached positions from `length` on, in place (used to undo a lookahead forward)."""
    for layer in cache.layers:
        layer.truncate(length)


def rewind_cache(cache: DynamicCache, count: int) -> None:
    """Drop every layer's newest `count` positions, keeping its buffers (`_Appending.rewind`)."""
    for layer in cache.layers:
        layer.rewind(count)


def head_size(config) -> int:
    """The size of one attention head of a model's (text) config: its `head_dim` where it sets one (Qwen3 and others
    make it differ from hidden / heads), else hidden / heads."""
    config = config.get_text_config()
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def kv_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes one token's keys and values take in an uncompressed cache of `model`: every layer, every KV head, in
    the activations' dtype (the input embedding's: a bfloat16-weights model holds float32 activations)."""
    config = model.config.get_text_config()
    element = model.get_input_embeddings().weight.element_size()
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_size(config) * element


def kv_bytes(cache: DynamicCache) -> int:
    """Bytes of keys and values actually held by a cache."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, HeadwiseLayer):
            total += layer.nbytes()
        elif isinstance(layer, BatchLayer):  # padded rows count: they are held
            total += sum(x.numel() * x.element_size() for x in (layer.prefix_keys, layer.prefix_values,
                                                                  layer.keys, layer.values))
        elif layer.keys is not None:
            total += layer.keys.numel() * layer.keys.element_size() * 2
    return total


def kept_pairs(cache: DynamicCache) -> int:
    """KV pairs (position x KV head x layer) held for the prompt part of a freshly compressed cache."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, HeadwiseLayer):
            total += int(layer.head_lengths.sum())
        else:
            total += layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2]
    return total
