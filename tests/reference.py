"""Slow, independent implementations written from ../shared/spec/methods.md, on materialised eager attention.

Everything here loops over heads and positions in Python and ranks with `sorted` (ties to the lower position),
so it shares no code with the library beyond the model itself.
"""

from __future__ import annotations

import copy

import torch


def eager_attentions(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Full `(H, T, T)` attention probabilities of every layer, from an eager copy of `model`."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        out = eager(input_ids=ids, output_attentions=True)
    return [a[0].float() for a in out.attentions]


def pool(values: list[float], kind: str, kernel: int) -> list[float]:
    left, n = (kernel - 1) // 2, len(values)
    out = []
    for i in range(n):
        window = [values[j] if 0 <= j < n else 0.0 for j in range(i - left, i - left + kernel)]
        out.append(max(window) if kind == "max" else sum(window) / kernel)
    return out


def ranked(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])


def kv_scores(attn: torch.Tensor, rows: range, columns: int, kv_heads: int, reduction: str, kind: str,
              kernel: int) -> list[list[float]]:
    """Per KV head: reduce the window rows and the query heads of the group, then pool."""
    heads = attn.shape[0]
    group = heads // kv_heads
    result = []
    for g in range(kv_heads):
        per_key = []
        for k in range(columns):
            vals = [float(attn[h, r, k]) for h in range(g * group, (g + 1) * group) for r in rows]
            per_key.append(max(vals) if reduction == "max" else sum(vals) / len(vals))
        result.append(pool(per_key, kind, kernel))
    return result


def speckv_keep(target, ids: torch.Tensor, draft_tokens: torch.Tensor, budget: int, window: int, kernel: int,
                pool_kind: str = "max", reduction: str = "max") -> list[list[set[int]]]:
    """Kept prompt positions per layer and KV head for SpecKV (SnapKV when there are no draft tokens and
    `snap=True` semantics are emulated by the caller)."""
    n, lookahead = ids.shape[1], draft_tokens.shape[1]
    full = torch.cat([ids, draft_tokens], dim=1)
    kv_heads = target.config.num_key_value_heads
    keep = []
    for attn in eager_attentions(target, full):
        rows = range(n - window - 1, n + lookahead)
        scores = kv_scores(attn, rows, n - window - 1, kv_heads, reduction, pool_kind, kernel)
        keep.append([set(ranked(s)[: budget - window]) | set(range(n - window - 1, n - 1)) for s in scores])
    return keep


def snapkv_keep(target, ids: torch.Tensor, budget: int, window: int, kernel: int) -> list[list[set[int]]]:
    n = ids.shape[1]
    kv_heads = target.config.num_key_value_heads
    keep = []
    for attn in eager_attentions(target, ids):
        scores = kv_scores(attn, range(n - window, n), n - window, kv_heads, "max", "max", kernel)
        keep.append([set(ranked(s)[: budget - window]) | set(range(n - window, n)) for s in scores])
    return keep


def specpc_positions(draft, ids: torch.Tensor, budget: int, window: int, kernel: int, neighbors: int,
                     start_layer: int) -> list[int]:
    """SpecPC with one lookahead token: weighted window rows, max over heads, rows and layers; rank-major."""
    n = ids.shape[1]
    attns = eager_attentions(draft, ids)[start_layer:]
    score = [0.0] * n
    for attn in attns:
        for h in range(attn.shape[0]):
            for i, r in enumerate(range(n - window, n)):
                weight = i / (window - 1) if window > 1 else 1.0
                for k in range(n):
                    score[k] = max(score[k], float(attn[h, r, k]) * weight)
    smooth = pool(score, "max", kernel)
    top = ranked(smooth)[:budget]
    offsets = sorted(range(-((neighbors - 1) // 2), neighbors - (neighbors - 1) // 2), key=abs)
    expanded = [min(max(t + o, 0), n - 1) for t in top for o in offsets]
    order = list(range(n - window, n)) + expanded
    seen: list[int] = []
    for p in order:
        if p not in seen:
            seen.append(p)
    return sorted(seen[:budget])


def specprefill_positions(draft, ids: torch.Tensor, lookahead_tokens: torch.Tensor, budget: int, kernel: int,
                          chunk: int) -> list[int]:
    """SpecPrefill: rows = last prompt position + the lookahead tokens fed back; softmax over the prompt only
    (renormalised from the full rows); avg-pool per (layer, head, row); max over layers and heads; mean over rows;
    chunks ranked by mean score, taken whole in rank order, cut to the budget."""
    n = ids.shape[1]
    full = torch.cat([ids, lookahead_tokens[:, :-1]], dim=1)
    rows = range(n - 1, full.shape[1])
    best = [[0.0] * n for _ in rows]
    for attn in eager_attentions(draft, full):
        for h in range(attn.shape[0]):
            for i, r in enumerate(rows):
                probs = [float(attn[h, r, k]) for k in range(n)]
                total = sum(probs)
                pooled = pool([p / total for p in probs], "avg", kernel)
                best[i] = [max(a, b) for a, b in zip(best[i], pooled, strict=True)]
    score = [sum(best[i][k] for i in range(len(rows))) / len(rows) for k in range(n)]
    chunks = [list(range(s, min(s + chunk, n))) for s in range(0, n, chunk)]
    means = [sum(score[k] for k in c) / len(c) for c in chunks]
    order = [k for c in ranked(means) for k in chunks[c]]
    return sorted(order[:budget])
