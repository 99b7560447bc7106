"""VeriSpecKV: SpecKV whose draft answer the target checks before trusting it (ours; beyond the paper).

SpecKV fails when the draft answers wrong: the wrong answer's queries point at the wrong needle and the kept pairs
follow them. The target already runs the draft's answer over its full prompt cache to score it, so asking that
same forward for its logits (one output projection more) shows where the target would have written something else:
speculative decoding's acceptance test. The draft's answer is trusted up to the first token the target rejects;
from there the target writes `correct` tokens of its own on the full cache (the answer FullKV would give, which is
the lookahead the draft should have written), and their queries stand in for the rejected ones. Every one of these
tokens is discarded afterwards, as SpecKV's are.

The other knobs are the hedges of issue 25's study, kept so that each can be measured against the default:
`share` of the budget given to prompt-only (window) scores, fixed or scaled by the draft's doubt (`gate`), the two
sources normalised before they are combined (`normalize`), and AdaKV's allocation (`allocation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import truncate_cache
from ..capture import QueryCapture, check_captured
from ..draft import PromptState, greedy_from
from ..errors import ConfigError
from ..forward import forward
from ..scoring import adaptive_mask, rank, topk_mask
from .base import choice, positive
from .scorer import ScorerKV, Scores


@dataclass
class Lookahead:
    """The rows that score the prompt after verification: queries `(b, H, R, d)` and keys `(b, G, R, d)` per layer
    at positions `n .. n+R-1` (the accepted draft tokens, then the target's own), and how much of the draft held."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    drafted: int
    accepted: int
    corrected: int

    @property
    def rows(self) -> int:
        return self.accepted + self.corrected

    @property
    def agreement(self) -> float:
        """The share of the draft's answer the target accepted (1 when there was nothing to check)."""
        return self.accepted / self.drafted if self.drafted else 1.0


@dataclass
class VeriSpecKV(ScorerKV):
    """`verify`: the target checks the draft's answer and keeps it up to its first rejected token; `correct`:
    target tokens written from the rejection on (0: none); `lookahead`: draft tokens (None: max_new_tokens).
    `share`: fraction of the non-window slots kept for the prompt tail's own top pairs; `gate`: `none` (the share
    as given), `agreement` (the share times the fraction of the draft the target rejected) or `margin` (times the
    draft's mean doubt, 1 - top-1 + top-2 probability). `normalize`: `none` (SpecKV's max over raw attention),
    `mass` (the mean of each source's per-head distribution) or `rank` (the max of each source's rank
    percentile). `allocation`: `uniform` (the top pairs of every KV head) or `adaptive` (AdaKV, floor `alpha`).
    With `verify=False, correct=0, share=0` it is SpecKV exactly."""

    verify: bool = True
    correct: int = 8
    lookahead: int | None = None
    share: float = 0.0
    gate: str = "none"
    normalize: str = "none"
    allocation: str = "uniform"
    alpha: float = 0.2
    name = "verispeckv"
    summary = "SpecKV whose draft answer the target verifies: kept up to its first rejected token, then the target's"
    needs_draft = True

    def validate(self) -> None:
        positive(self, "correct", self.correct, minimum=0)
        if self.lookahead is not None:
            positive(self, "lookahead", self.lookahead, minimum=0)
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) or not 0 <= self.share <= 1:
            raise ConfigError(f"{self.name}: share must be in [0, 1], got {self.share!r}")
        choice(self, "gate", self.gate, ("none", "agreement", "margin"))
        choice(self, "normalize", self.normalize, ("none", "mass", "rank"))
        choice(self, "allocation", self.allocation, ("uniform", "adaptive"))
        if self.gate == "agreement" and not self.verify:
            raise ConfigError(f"{self.name}: gate=agreement needs verify=true (the agreement is the target's)")
        if self.correct and not self.verify:
            raise ConfigError(f"{self.name}: correct={self.correct} needs verify=true (nothing is rejected without it)")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{self.name}: alpha must be in [0, 1], got {self.alpha}")
        super().validate()

    @property
    def rows(self) -> int:
        return self.window + 1

    def verified(self, state: PromptState, length: int) -> Lookahead:
        """The draft's answer checked by the target on the shared prompt cache, which is left as it was found.
        Shared by every setting that agrees on the lookahead (the budget, share and allocation do not enter)."""
        n, target = state.n, state.target
        tokens = state.lookahead(length) if length > 0 else state.input_ids[:, :0]
        drafted = tokens.shape[1]
        if not drafted:
            return Lookahead({}, {}, 0, 0, 0)
        seen = QueryCapture(rows=drafted)
        with state.timings.phase("target_lookahead", target.device):
            logits = forward(target, tokens, state.cache, n, logits=False, every=self.verify, capture=seen)
        check_captured(target, seen)
        accepted = drafted
        if self.verify:
            # the target's own choice at each draft token: from the prompt's last logits, then from each draft token
            wanted = torch.cat([state.logits[:, None], logits[:, :-1]], dim=1).argmax(-1)
            rejected = (wanted[0] != tokens[0].to(wanted.device)).nonzero()
            accepted = int(rejected[0]) if rejected.numel() else drafted
        queries = {i: q[..., :accepted, :] for i, q in seen.queries.items()}
        corrected = 0
        if accepted < drafted and self.correct:
            truncate_cache(state.cache, n + accepted)
            own = QueryCapture(rows=self.correct)
            start = state.logits if accepted == 0 else logits[:, accepted - 1]
            with state.timings.phase("target_lookahead", target.device):
                # `correct + 1` tokens feed `correct` of them (the last is never fed); fewer when it stops at EOS
                greedy_from(target, start, state.cache, n + accepted, self.correct + 1, state.eos_ids, capture=own)
            if own.queries:
                corrected = next(iter(own.queries.values())).shape[2]
                queries = {i: torch.cat([q, own.queries[i]], dim=2) for i, q in queries.items()}
        keys = {i: state.cache.layers[i].keys[:, :, n:n + accepted + corrected].clone() for i in queries}
        truncate_cache(state.cache, n)
        return Lookahead(queries, keys, drafted, accepted, corrected)

    def share_of(self, state: PromptState, look: Lookahead, length: int) -> float:
        """The share of the slots the prompt tail's own top pairs get, after the gate."""
        if self.gate == "agreement":
            return self.share * (1 - look.agreement)
        if self.gate == "margin" and look.drafted:
            return self.share * float(1 - state.lookahead_margins(length).mean())
        return self.share

    def scores(self, state: PromptState) -> Scores:
        n, w = state.n, self.window
        length = state.max_new_tokens if self.lookahead is None else self.lookahead
        settings = (self.name, length, self.verify, self.correct)
        look = state.scores_for(settings, lambda: self.verified(state, length))
        slots = self.tokens(n) - w
        reserved = round(self.share_of(state, look, length) * slots)
        tail_at = torch.arange(n - w - 1, n)
        rows = look.rows
        look_at = torch.arange(n, n + rows)
        columns = n - w - 1
        with state.timings.phase("scoring", state.target.device):
            per_layer = []
            for i, q in sorted(state.queries.queries.items()):
                tail_q, scaling = q[..., -(w + 1):, :], state.queries.scaling[i]
                keys = state.cache.layers[i].keys
                if rows:
                    keys = torch.cat([keys, look.keys[i].to(keys.dtype)], dim=2)
                if self.normalize == "none" and not reserved:  # SpecKV's own reduction over all rows at once
                    both = torch.cat([tail_q, look.queries[i]], dim=2) if rows else tail_q
                    per_layer.append(self.layer_scores(both, torch.cat([tail_at, look_at]), keys, columns, scaling))
                    continue
                tail = self.layer_scores(tail_q, tail_at, keys, columns, scaling)
                ahead = self.layer_scores(look.queries[i], look_at, keys, columns, scaling) if rows else None
                per_layer.append(_reserve(_combine(tail, ahead, self.normalize), tail, reserved))
        return Scores(per_layer, range(n - w - 1, n - 1), refeed=True)

    def allocate(self, scores: Scores, slots: int, n: int) -> list[torch.Tensor]:
        if self.allocation == "adaptive":
            return [adaptive_mask(s, slots, self.alpha, n) for s in scores.per_layer]
        return [topk_mask(s, slots, n) for s in scores.per_layer]


def _combine(tail: torch.Tensor, ahead: torch.Tensor | None, normalize: str) -> torch.Tensor:
    """One score per candidate from the prompt tail's and the lookahead's, each `(b, G, m)` and in [0, 1]."""
    if ahead is None:
        return tail
    if normalize == "mass":
        return (tail / tail.sum(-1, keepdim=True).clamp_min(1e-30) +
                ahead / ahead.sum(-1, keepdim=True).clamp_min(1e-30)) / 2
    if normalize == "rank":
        return torch.maximum(_percentile(tail), _percentile(ahead))
    return torch.maximum(tail, ahead)


def _percentile(scores: torch.Tensor) -> torch.Tensor:
    """Each candidate's place in its head's ranking, 1 for the best and near 0 for the worst (ties: lower first)."""
    m = scores.shape[-1]
    places = torch.empty_like(scores)
    steps = torch.arange(m, 0, -1, device=scores.device, dtype=scores.dtype) / m
    return places.scatter_(-1, rank(scores), steps.expand_as(scores))


def _reserve(scores: torch.Tensor, tail: torch.Tensor, reserved: int) -> torch.Tensor:
    """Lift each head's `reserved` best prompt-tail candidates above every other score (all are <= 1), so that
    any allocation takes them first and fills the rest by `scores`."""
    if reserved <= 0:
        return scores
    top = rank(tail)[..., :reserved]
    return scores.scatter_add(-1, top, torch.full(top.shape, 2.0, dtype=scores.dtype, device=scores.device))
