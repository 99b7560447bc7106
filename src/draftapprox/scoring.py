"""Attention-based importance: window scores, pooling, and the selections built on them (spec sections 1-3).

Scores are computed from captured post-RoPE window queries and cached keys, `rows x n` per head in float32, never
from an `n x n` matrix. Rankings use a stable descending sort, so ties (frequent after max pooling, which turns
peaks into plateaus) resolve to the lower position, deterministically.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError


def window_probs(queries: torch.Tensor, query_pos: torch.Tensor, keys: torch.Tensor, columns: int,
                 scaling: float) -> torch.Tensor:
    """Softmax attention of window queries over all keys, causal by absolute position, first `columns` kept.

    queries `(b, H, R, d)` at positions `query_pos (R,)`; keys `(b, G, K, d)` at positions `0..K-1`.
    Returns `(b, G, H/G, R, columns)` float32: query heads grouped under their KV head, as GQA's repeat_kv does.
    """
    b, h, r, d = queries.shape
    g, k = keys.shape[1], keys.shape[2]
    q = queries.float().reshape(b, g, (h // g) * r, d)
    logits = q @ keys.float().transpose(-1, -2) * scaling
    future = torch.arange(k, device=keys.device)[None, :] > query_pos.to(keys.device)[:, None]  # (R, K)
    logits = logits.view(b, g, h // g, r, k).masked_fill(future, float("-inf"))
    return logits.softmax(-1)[..., :columns]


def reduce(x: torch.Tensor, dims: tuple[int, ...], how: str) -> torch.Tensor:
    if how == "max":
        return x.amax(dim=dims)
    if how == "mean":
        return x.mean(dim=dims)
    raise ConfigError(f"reduction must be 'max' or 'mean', not {how!r}")


def pool1d(scores: torch.Tensor, pool: str, kernel: int) -> torch.Tensor:
    """Stride-1 smoothing along the last axis with zero padding, (kernel-1)//2 on the left, the rest on the right.

    For odd kernels this is the reference's `padding=kernel//2` ("same"), counting pads in averages as
    `avg_pool1d` does by default; for SpecPC's even kernels it is the reference's centred pad. Scores are >= 0, so
    zero padding equals -inf padding for max pooling.
    """
    if kernel <= 1:
        return scores
    shape = scores.shape
    x = F.pad(scores.reshape(-1, 1, shape[-1]), ((kernel - 1) // 2, kernel - 1 - (kernel - 1) // 2))
    if pool == "max":
        x = F.max_pool1d(x, kernel, stride=1)
    elif pool == "avg":
        x = F.avg_pool1d(x, kernel, stride=1)
    else:
        raise ConfigError(f"pool must be 'max' or 'avg', not {pool!r}")
    return x.view(shape)


def kv_head_scores(probs: torch.Tensor, reduction: str, pool: str, kernel: int) -> torch.Tensor:
    """Section 1: reduce window rows and the query heads of each KV head, then pool: `(b, G, columns)`."""
    return pool1d(reduce(probs, (2, 3), reduction), pool, kernel)


def rank(scores: torch.Tensor) -> torch.Tensor:
    """Indices along the last axis by decreasing score; ties go to the lower index."""
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices


def topk_mask(scores: torch.Tensor, k: int | torch.Tensor, length: int) -> torch.Tensor:
    """Boolean mask `(..., length)` of the top-k candidates of `scores (..., m)`, `m <= length`.

    `k` is one count or a tensor of counts broadcastable to `scores.shape[:-1]` (per-layer or per-head budgets).
    """
    order = rank(scores)
    m = scores.shape[-1]
    k = torch.as_tensor(k, device=scores.device)
    chosen = torch.arange(m, device=scores.device) < k[..., None]
    mask = torch.zeros(*scores.shape[:-1], length, dtype=torch.bool, device=scores.device)
    return mask.scatter(-1, order, chosen.expand_as(order))


def adaptive_mask(scores: torch.Tensor, per_head: int, alpha: float, length: int) -> torch.Tensor:
    """AdaKV allocation for one layer: the top `G * per_head` (head, position) pairs chosen jointly.

    Each head first gets a floor of `int(alpha * per_head)` of its own best candidates (kvpress's safeguard), the
    rest of the layer's total goes to the best remaining pairs of any head. `scores (b, G, m)`.
    """
    b, g, m = scores.shape
    floor = int(alpha * per_head)
    order = rank(scores)
    boosted = scores.clone()
    boosted.scatter_(-1, order[..., :floor], float("inf"))
    flat = rank(boosted.reshape(b, g * m))[:, : g * per_head]
    chosen = torch.zeros(b, g * m, dtype=torch.bool, device=scores.device).scatter(1, flat, True)
    mask = torch.zeros(b, g, length, dtype=torch.bool, device=scores.device)
    mask[..., :m] = chosen.view(b, g, m)
    return mask


def pyramid_budgets(mean_slots: int, layers: int, beta: float, cap: int) -> list[int]:
    """PyramidKV's non-window slots per layer: linear from bottom to top, top = mean/beta, mean exactly `mean_slots`.

    KVCache-Factory computes `min = (C-w)/beta, max = 2(C-w) - min` with integer steps, which misses the mean by a
    few slots; we round the same line by largest remainders so the total is exact, and cap each layer at the `cap`
    candidates there are (moving the excess to the layers below the cap).
    """
    if layers == 1:
        return [min(mean_slots, cap)]
    low = mean_slots / beta
    high = 2 * mean_slots - low
    line = [high - i * (high - low) / (layers - 1) for i in range(layers)]
    total = min(mean_slots * layers, cap * layers)
    budgets = [min(math.floor(x), cap) for x in line]
    while sum(budgets) < total:
        # Largest remainder first; layers at the cap take nothing more.
        rem = [(line[i] - budgets[i], -i) for i in range(layers) if budgets[i] < cap]
        _, neg_i = max(rem)
        budgets[-neg_i] += 1
    return budgets


def specpc_select(scores: torch.Tensor, budget: int, window: int, kernel: int, neighbors: int,
                  pool: str) -> torch.Tensor:
    """SpecPC's token selection (spec 3, step 3) for `scores (b, n)`: kept positions `(b, min(budget, n))`, sorted.

    Smooth, rank the top `budget` tokens, expand each rank-major into its `neighbors` (nearest first, clamped),
    de-duplicate keeping order, put the last `window` tokens first, de-duplicate, cut to `budget`, sort.
    """
    b, n = scores.shape
    if budget >= n:
        return torch.arange(n, device=scores.device).expand(b, n)
    smooth = pool1d(scores, pool, kernel)
    top = rank(smooth)[:, :budget]
    if neighbors > 0:
        offsets = torch.arange(-((neighbors - 1) // 2), neighbors - (neighbors - 1) // 2, device=scores.device)
        offsets = offsets[torch.sort(offsets.abs(), stable=True).indices]
        top = (top[..., None] + offsets).clamp(0, n - 1).reshape(b, -1)
    tail = torch.arange(max(n - window, 0), n, device=scores.device).expand(b, -1)
    ordered = torch.cat([tail, top], dim=1)
    return torch.stack([_first_unique(row, budget) for row in ordered]).sort(-1).values


def _first_unique(row: torch.Tensor, limit: int) -> torch.Tensor:
    """The first `limit` distinct values of `row`, in order of first occurrence (vectorised pandas.unique)."""
    values, inverse = torch.unique(row, return_inverse=True)
    first = torch.full((values.numel(),), row.numel(), dtype=torch.long, device=row.device)
    first.scatter_reduce_(0, inverse, torch.arange(row.numel(), device=row.device), reduce="amin")
    return values[torch.argsort(first)][:limit]


def chunk_select(scores: torch.Tensor, budget: int, chunk: int) -> torch.Tensor:
    """SpecPrefill's selection: rank chunks of `chunk` consecutive positions by their mean score and keep whole
    chunks in rank order (the last, shorter chunk averages its own length), cut to `budget`; sorted `(b, budget)`.
    """
    b, n = scores.shape
    ids = torch.arange(n, device=scores.device) // chunk
    chunks = int(ids[-1]) + 1
    sums = torch.zeros(b, chunks, device=scores.device, dtype=scores.dtype).index_add_(1, ids, scores)
    means = sums / torch.bincount(ids, minlength=chunks).to(scores.dtype)
    chunk_rank = torch.empty_like(ids.expand(b, -1)[:, :chunks])
    chunk_rank.scatter_(1, rank(means), torch.arange(chunks, device=scores.device).expand(b, -1))
    order = torch.sort(chunk_rank[:, ids] * n + torch.arange(n, device=scores.device), dim=-1).indices
    return order[:, :budget].sort(dim=-1).values
