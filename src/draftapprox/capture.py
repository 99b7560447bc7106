"""One attention-capture mechanism for every architecture that uses transformers' attention-function registry.

Every modern transformers decoder (Llama, Qwen2, Qwen3, Mistral, ...) computes its post-RoPE queries and keys in
its own attention module and then calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]`. We register a thin
wrapper around the model's own kernel (SDPA by default) under a new name and switch the model to it. Outside a
`scope` the wrapper only forwards, so a prepared model behaves exactly as before. Inside a scope it
- records the trailing query rows of each layer (post-RoPE, so position information is already applied), which is
  all the window scores of every attention-based method need: keys come from the KV cache, and no `n x n` attention
  matrix is ever formed;
- lets layers of a compressed cache with per-head lengths compute their own attention (see `cache.HeadwiseLayer`).
No per-model copy of attention code is involved, which is what lets one method file serve every architecture.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from .attention import causal, single_query
from .errors import ModelError

PREFIX = "draftapprox_"


@dataclass
class QueryCapture:
    """Keeps the last `rows` query rows per layer, concatenated across successive forwards."""

    rows: int
    layers: frozenset[int] | None = None
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)

    def record(self, layer: int, query: torch.Tensor, scaling: float) -> None:
        if self.layers is not None and layer not in self.layers:
            return
        # A copy, not a view: a view would keep the whole prefill's queries of every layer alive.
        q = query[..., -self.rows:, :].detach().clone()
        if layer in self.queries:
            q = torch.cat([self.queries[layer], q], dim=2)[..., -self.rows:, :]
        self.queries[layer] = q
        self.scaling[layer] = scaling


class StopForward(Exception):
    """Ends a forward early once the last layer it needs has been reached; `forward.forward` catches it."""


@dataclass
class _Scope:
    capture: QueryCapture | None
    cache: object | None
    single_query_unmasked: bool
    stop_after: int | None
    sparse: object | None
    rows_apart: bool = False


_scope: ContextVar[_Scope | None] = ContextVar("draftapprox_scope", default=None)


@contextmanager
def scope(capture: QueryCapture | None = None, cache: object | None = None,
          single_query_unmasked: bool = False, stop_after: int | None = None,
          sparse: object | None = None, rows_apart: bool = False) -> Iterator[QueryCapture | None]:
    """Activate capture and/or compressed-cache attention for the forwards run inside the block.

    `single_query_unmasked`: a single new query attends to every cached key, so its mask is dropped. That is what
    makes decoding correct on caches whose layers hold different numbers of keys (PyramidKV, AdaKV), where a mask
    built from layer 0's length would be wrong for the others.
    `stop_after`: end the forward (raising `StopForward`) once this layer has cached its keys and recorded its
    queries, skipping that layer's attention and everything after it.
    `sparse`: a `sparse.VerticalSlash` that computes multi-query attention instead of the model's kernel.
    `rows_apart`: several new queries over a cache are each computed as a one-query decode step over the keys up to
    its own position, bit for bit what that step gives (a speculative check).
    """
    token = _scope.set(_Scope(capture, cache, single_query_unmasked, stop_after, sparse, rows_apart))
    try:
        yield capture
    finally:
        _scope.reset(token)


def _base_function(base: str):
    if base == "eager":
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward
    if base not in AttentionInterface._global_mapping:
        raise ModelError(f"attention implementation {base!r} is not registered in transformers")
    return AttentionInterface._global_mapping[base]


def _make_wrapper(base: str):
    base_fn = _base_function(base)
    causal_chunks = base == "sdpa"  # an eager base is a reference: it keeps its own masked kernel

    def attention(module, query, key, value, attention_mask, dropout=0.0, **kwargs):
        kwargs["dropout"] = dropout  # positional from some callers (kvpress's attention patch), a keyword from most
        active = _scope.get()
        if active is not None:
            scaling = kwargs.get("scaling") or query.shape[-1] ** -0.5
            if active.capture is not None:
                active.capture.record(module.layer_idx, query, scaling)
            if active.stop_after == module.layer_idx:
                raise StopForward
            if active.sparse is not None and query.shape[2] > 1:
                return active.sparse.attend(module.layer_idx, query, key, value, scaling), None
            layers = getattr(active.cache, "layers", None)
            own = layers[module.layer_idx] if layers is not None and hasattr(layers[module.layer_idx], "attend") \
                else None
            if active.rows_apart and query.shape[2] > 1 and _plain(kwargs):
                return _rows_apart(own, query, key, value, scaling), None
            if own is not None:
                return own.attend(query, key, value, scaling)
            if active.single_query_unmasked and query.shape[2] == 1:
                attention_mask = None
            if query.shape[2] == 1 and attention_mask is None and _plain(kwargs):
                return single_query(query, key, value, scaling), None
            if (causal_chunks and query.shape[2] > 1 and (attention_mask is None or query.shape[0] == 1)
                    and query.is_cpu and _plain(kwargs) and kwargs.get("sliding_window") is None
                    and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False):
                # the queries are the newest keys: with no mask, a whole causal prompt; with one, a chunk after
                # the first or a lookahead (forward never pads)
                return causal(query, key, value, scaling), None
        return base_fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"{PREFIX}{base}"
    return attention


def _rows_apart(layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of `query (b, H, q, d)`, the newest `q` of `key/value`, one query at a time over the keys up to
    its own position: what `q` one-token decode steps compute, the compressed layer's own `attend` where it has
    one. Returns `(b, q, H, d)`."""
    q, t = query.shape[2], key.shape[2]
    out = []
    for i in range(q):
        end = t - q + i + 1
        row, keys, values = query[:, :, i:i + 1], key[:, :, :end], value[:, :, :end]
        out.append(layer.attend(row, keys, values, scaling)[0] if layer is not None
                   else single_query(row, keys, values, scaling))
    return torch.cat(out, dim=1)


_PLAIN = {"scaling", "dropout", "sliding_window", "position_ids", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k",
          "max_length_q", "max_length_k", "is_causal", "output_attentions", "cache_position"}


def _plain(kwargs: dict) -> bool:
    """Whether a layer's attention is plain softmax attention that `single_query` computes exactly: no dropout, no
    logit soft-capping, attention sinks or other extras an architecture may pass."""
    return not kwargs.get("dropout") and all(k in _PLAIN or v is None for k, v in kwargs.items())


def _register(base: str) -> str:
    name = f"{PREFIX}{base}"
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_wrapper(base))
        mask_base = base if base in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping else "sdpa"
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[mask_base])
    return name


def prepare(model: PreTrainedModel) -> PreTrainedModel:
    """Route a model's attention through the capture wrapper; fails clearly for architectures it cannot handle."""
    arch = type(model).__name__
    if not getattr(model, "_supports_attention_backend", False):
        raise ModelError(f"{arch} does not route its attention through transformers' attention-function "
                         "registry, so draftapprox cannot capture its queries (supported: Llama, Qwen2, Qwen3, "
                         "Mistral and other decoders that use AttentionInterface)")
    layers = decoder_layers(model)
    if not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx") for layer in layers):
        raise ModelError(f"{arch}: decoder layers without a standard `self_attn` module are not supported")
    current = model.config._attn_implementation or "sdpa"
    if current.startswith(PREFIX):
        return model
    model.set_attn_implementation(_register(current))
    return model


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ModelError(f"{type(model).__name__}: no decoder `layers` found; architecture not supported")
    return layers


def check_captured(model: PreTrainedModel, capture: QueryCapture) -> None:
    """Fail loudly rather than score from nothing when a model bypassed the wrapper."""
    wanted = capture.layers if capture.layers is not None else range(len(decoder_layers(model)))
    missing = [i for i in wanted if i not in capture.queries]
    if missing:
        raise ModelError(f"{type(model).__name__}: no queries were captured in layers {missing[:5]}; its attention "
                         "does not go through transformers' attention-function registry")
