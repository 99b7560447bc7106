"""Slow, independent implementations written from docs/spec/methods.md, on materialised eager attention.

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
                     start_layer: int, lookahead_tokens: torch.Tensor | None = None) -> list[int]:
    """SpecPC: weighted window rows and (with `lookahead_tokens`, the draft's greedy answer) the rows of every
    generated token after the first, weight 1; max over heads, rows and layers; rank-major expansion."""
    n = ids.shape[1]
    fed = ids if lookahead_tokens is None else torch.cat([ids, lookahead_tokens[:, :-1]], dim=1)
    attns = eager_attentions(draft, fed)[start_layer:]
    score = [0.0] * n
    for attn in attns:
        for h in range(attn.shape[0]):
            for i, r in enumerate(range(n - window, fed.shape[1])):
                weight = min(i / (window - 1), 1.0) if window > 1 else 1.0  # lookahead rows: 1
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


def streamingllm_keep(n: int, budget: int, sinks: int) -> set[int]:
    """The first `sinks` positions and the last `budget - sinks`: the same for every layer and head."""
    return set(range(sinks)) | set(range(n - (budget - sinks), n))


def _snap_scores(target, ids: torch.Tensor, window: int, kernel: int) -> list[list[list[float]]]:
    n = ids.shape[1]
    return [kv_scores(attn, range(n - window, n), n - window, target.config.num_key_value_heads, "max", "max", kernel)
            for attn in eager_attentions(target, ids)]


def pyramid_slots(mean: int, layers: int, beta: float) -> list[int]:
    """Non-window slots per layer on the line from `2*mean - mean/beta` (bottom) to `mean/beta` (top), rounded so
    that they sum to `layers * mean`: floors first, then one more slot to the largest remainders, lower layer first
    among equals."""
    low, high = mean / beta, 2 * mean - mean / beta
    line = [high - layer * (high - low) / (layers - 1) for layer in range(layers)]
    slots = [int(x // 1) for x in line]
    by_remainder = sorted(range(layers), key=lambda layer: (-(line[layer] - slots[layer]), layer))
    for layer in by_remainder[: layers * mean - sum(slots)]:
        slots[layer] += 1
    return slots


def pyramidkv_keep(target, ids: torch.Tensor, budget: int, window: int, kernel: int, beta: float
                   ) -> list[list[set[int]]]:
    n = ids.shape[1]
    scores = _snap_scores(target, ids, window, kernel)
    slots = pyramid_slots(budget - window, len(scores), beta)
    window_set = set(range(n - window, n))
    return [[set(ranked(head)[:k]) | window_set for head in layer] for layer, k in zip(scores, slots, strict=True)]


def adakv_keep(target, ids: torch.Tensor, budget: int, window: int, kernel: int, alpha: float
               ) -> list[list[set[int]]]:
    """Per layer: each KV head's `int(alpha * (budget - window))` best candidates, then the rest of the layer's
    `G * (budget - window)` slots to the best remaining (head, position) pairs of any head (ties: lower head, then
    lower position); plus the window for every head."""
    n = ids.shape[1]
    per_head = budget - window
    floor = int(alpha * per_head)
    keep = []
    for layer in _snap_scores(target, ids, window, kernel):
        chosen = [set(ranked(head)[:floor]) for head in layer]
        rest = sorted(((-head[k], g, k) for g, head in enumerate(layer) for k in range(len(head))
                       if k not in chosen[g]))
        for _, g, k in rest[: len(layer) * per_head - sum(map(len, chosen))]:
            chosen[g].add(k)
        keep.append([c | set(range(n - window, n)) for c in chosen])
    return keep


def masked_greedy(model, ids: torch.Tensor, keep: list[list[set[int]]], steps: int) -> torch.Tensor:
    """`steps` greedy tokens after `ids`, every new token's queries seeing of the prompt only the keys that `keep`
    holds for its layer and KV head (and all generated keys); the first token comes from the full prefill.
    Eager attention written here: causal softmax in float32 over masked scores."""
    from transformers import AttentionInterface

    n = ids.shape[1]

    def masked(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        heads, kv_heads = query.shape[1], key.shape[1]
        key = key.repeat_interleave(heads // kv_heads, dim=1)
        value = value.repeat_interleave(heads // kv_heads, dim=1)
        t = query.shape[2]
        scores = (query.float() @ key.float().transpose(-1, -2)) * scaling
        allowed = torch.ones(heads, t, t, dtype=torch.bool).tril()
        for h in range(heads):
            hidden = [p for p in range(n) if p not in keep[module.layer_idx][h // (heads // kv_heads)]]
            allowed[h, n:, hidden] = False
        scores = scores.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(scores, dim=-1).to(value.dtype) @ value
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register("reference_masked", masked)
    copy_ = copy.deepcopy(model)
    copy_.set_attn_implementation("reference_masked")
    tokens = ids
    with torch.no_grad():
        for _ in range(steps):
            logits = copy_(input_ids=tokens).logits[:, -1]
            tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens[:, n:]


def verified_lookahead(target, ids: torch.Tensor, draft_tokens: torch.Tensor, correct: int,
                       eos: frozenset[int] = frozenset(), draft=None, redraft: int = 0) -> tuple[torch.Tensor, int]:
    """VeriSpecKV's lookahead by full recomputation: the draft's tokens up to the first one the target, reading the
    prompt and the tokens before it, would not have chosen greedily. Then, `redraft` times, the target's token there
    followed by the draft's greedy rewrite (up to the lookahead's length, EOS included), checked the same way; then
    up to `correct` of the target's own greedy tokens (stopping before an EOS). Returns (tokens, how many of the
    draft's first answer were accepted)."""
    n, length = ids.shape[1], draft_tokens.shape[1]

    def choice(model, x: torch.Tensor) -> int:
        with torch.no_grad():
            return int(model(input_ids=x).logits[0, -1].argmax())

    seq, answer, first = ids, draft_tokens, None
    for round_ in range(redraft + 1):
        good = 0
        while good < answer.shape[1] and choice(target, seq) == int(answer[0, good]):
            seq, good = torch.cat([seq, answer[:, good:good + 1]], dim=1), good + 1
        first = good if first is None else first
        if good == answer.shape[1]:
            return seq[:, n:], first
        fix = choice(target, seq)
        if round_ == redraft or fix in eos:
            break
        rewrite, x = [fix], torch.cat([seq, torch.tensor([[fix]])], dim=1)
        for _ in range(length - (seq.shape[1] - n) - 1):
            token = choice(draft, x)
            rewrite.append(token)
            if token in eos:
                break
            x = torch.cat([x, torch.tensor([[token]])], dim=1)
        answer = torch.tensor([rewrite])
    for _ in range(correct):
        token = choice(target, seq)
        if token in eos:
            break
        seq = torch.cat([seq, torch.tensor([[token]])], dim=1)
    return seq[:, n:], first


def hedged_keep(target, ids: torch.Tensor, lookahead: torch.Tensor, budget: int, window: int, kernel: int,
                share: float, normalize: str) -> list[list[set[int]]]:
    """VeriSpecKV's selection given its (verified) lookahead tokens: per KV head, `round(share * slots)` best
    candidates by the prompt tail's rows alone, then the rest by the two sources combined (`none`: max over every
    row, as SpecKV; `mass`: the mean of each source's scores over their sum; `rank`: the max of each source's place
    in its ranking, 1 best, (m - i) / m for the i-th)."""
    n, rows = ids.shape[1], lookahead.shape[1]
    kv_heads, columns, slots = target.config.num_key_value_heads, n - window - 1, budget - window
    reserved = round(share * slots)
    keep = []
    for attn in eager_attentions(target, torch.cat([ids, lookahead], dim=1)):
        tail = kv_scores(attn, range(n - window - 1, n), columns, kv_heads, "max", "max", kernel)
        both = kv_scores(attn, range(n - window - 1, n + rows), columns, kv_heads, "max", "max", kernel)
        ahead = kv_scores(attn, range(n, n + rows), columns, kv_heads, "max", "max", kernel) if rows else None
        heads = []
        for g in range(kv_heads):
            if normalize == "none" or ahead is None:
                combined = both[g] if normalize == "none" else tail[g]
            elif normalize == "mass":
                t, a = sum(tail[g]), sum(ahead[g])
                combined = [(x / t + y / a) / 2 for x, y in zip(tail[g], ahead[g], strict=True)]
            else:
                places = []
                for source in (tail[g], ahead[g]):
                    place = [0.0] * columns
                    for i, k in enumerate(ranked(source)):
                        place[k] = (columns - i) / columns
                    places.append(place)
                combined = [max(x, y) for x, y in zip(*places, strict=True)]
            chosen = ranked(tail[g])[:reserved]
            rest = [k for k in ranked(combined) if k not in chosen]
            heads.append(set(chosen) | set(rest[: slots - len(chosen)]) | set(range(n - window - 1, n - 1)))
        keep.append(heads)
    return keep


def union_keep(target, ids: torch.Tensor, answers: list[torch.Tensor], budget: int, window: int,
               kernel: int) -> list[list[set[int]]]:
    """SpecKV's selection when several answers score the prompt: each answer in its own forward after the prompt,
    its rows (with the prompt tail's) reduced by max as SpecKV does, then the max over the answers per candidate."""
    n, kv_heads, columns = ids.shape[1], target.config.num_key_value_heads, ids.shape[1] - window - 1
    per_answer = []
    for answer in answers:
        rows = range(n - window - 1, n + answer.shape[1])
        per_answer.append([kv_scores(attn, rows, columns, kv_heads, "max", "max", kernel)
                           for attn in eager_attentions(target, torch.cat([ids, answer], dim=1))])
    keep = []
    for layer in zip(*per_answer, strict=True):
        heads = []
        for g in range(kv_heads):
            best = [max(values) for values in zip(*(scores[g] for scores in layer), strict=True)]
            heads.append(set(ranked(best)[: budget - window]) | set(range(n - window - 1, n - 1)))
        keep.append(heads)
    return keep
