"""Vertical-slash sparse prefill (spec 2, step 4), portable: SDPA over gathered key blocks, no custom kernel.

Each query attends to its KV head's `vertical` most important key columns (chosen per layer, before the layer's
attention, from the SpecKV scores of the prompt's tail and the draft tokens) plus a causal band of the `window`
keys before it. Queries are processed in blocks of `block`: a block's keys are the head's vertical columns that
lie before its band, gathered, and the contiguous key range its band spans; one boolean mask per block says which
of them each query may see. Work per query is then `vertical + window + block` keys instead of its position, and
memory per block is independent of the prompt length. Queries whose whole causal range fits in `vertical +
window` keys attend densely (exactly as the dense kernel), which is also the reference's threshold for sparsity.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .scoring import rank


@dataclass
class VerticalSlash:
    """`columns(layer, query, key, scaling) -> (b, G, m)` scores candidate key positions `0..m-1` per KV head; the
    scores are kept in `scores` for the caller (SpecKV reuses them instead of scoring twice)."""

    vertical: int
    window: int
    columns: Callable[[int, torch.Tensor, torch.Tensor, float], torch.Tensor]
    block: int = 256
    scores: dict[int, torch.Tensor] = field(default_factory=dict)

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """Attention output `(b, q, H, d)` of a prefill from position 0 (`q == key length`)."""
        scores = self.columns(layer, query, key, scaling)
        self.scores[layer] = scores
        top = rank(scores)[..., : self.vertical].sort(-1).values  # (b, G, V) ascending positions
        return vertical_slash_attention(query, key, value, top, self.window, scaling, self.block)


def vertical_slash_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, vertical: torch.Tensor,
                             window: int, scaling: float, block: int = 256, dense: int | None = None) -> torch.Tensor:
    """Causal attention of `query (b, H, q, d)` over `key/value (b, G, q, d)` restricted, per KV head, to the
    columns `vertical (b, G, V)` plus the band `i - window <= j <= i`; returns `(b, q, H, d)` as attention kernels
    hand back to transformers. Query heads map to KV heads as in transformers' `repeat_kv` (head h -> h // (H/G)).
    The first `dense` rows (default `V + window`: no more keys than the sparse pattern) attend densely.
    """
    b, h, q, d = query.shape
    g = key.shape[1]
    out = torch.empty_like(query)
    dense = min(q, vertical.shape[-1] + window if dense is None else dense)
    out[:, :, :dense] = F.scaled_dot_product_attention(query[:, :, :dense], key[:, :, :dense], value[:, :, :dense],
                                                       is_causal=True, scale=scaling, enable_gqa=h != g)
    is_vertical = torch.zeros(b, g, q, dtype=torch.bool, device=key.device).scatter(-1, vertical, True)
    gathered = vertical[..., None].expand(-1, -1, -1, d)
    vertical_keys, vertical_values = key.gather(2, gathered), value.gather(2, gathered)
    for start in range(dense, q, block):
        end = min(start + block, q)
        low = max(start - window, 0)  # the block's key range is low..end-1: every band, and verticals inside it
        rows = torch.arange(start, end, device=key.device)[:, None]
        cols = torch.arange(low, end, device=key.device)[None, :]
        causal = cols <= rows
        inside = (causal & (cols >= rows - window)) | (is_vertical[:, :, None, low:end] & causal)  # (b, G, B, K)
        before = (vertical < low)[:, :, None, :].expand(-1, -1, end - start, -1)  # columns left of the range
        mask = torch.cat([before, inside], dim=-1).repeat_interleave(h // g, dim=1)
        keys = torch.cat([vertical_keys, key[:, :, low:end]], dim=2)
        values = torch.cat([vertical_values, value[:, :, low:end]], dim=2)
        out[:, :, start:end] = F.scaled_dot_product_attention(query[:, :, start:end], keys, values, attn_mask=mask,
                                                              scale=scaling, enable_gqa=h != g)
    return out.transpose(1, 2).contiguous()
