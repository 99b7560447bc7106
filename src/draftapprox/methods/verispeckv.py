"""VeriSpecKV: SpecKV whose draft answer the target checks before trusting it (ours; beyond the paper).

SpecKV fails when the draft answers wrong: the wrong answer's queries point at the wrong needle and the kept pairs
follow them. The target already runs the draft's answer over its full prompt cache to score it, so asking that
same forward for its logits (one output projection more) shows where the target would have written something else:
speculative decoding's acceptance test. The draft's answer is trusted up to the first token the target rejects.
There the target's own token replaces it and the draft rewrites the rest of its answer from it (`redraft` rounds,
each checked again); after the last round the target writes `correct` tokens of its own on the full cache. What
scores the prompt is then the answer FullKV would give, as far as the rounds reach: the lookahead the draft should
have written. Every one of these tokens is discarded afterwards, as SpecKV's are.

The other knobs are the hedges of its study (docs/results/robust-speckv.md), kept so that each can be measured
against the default: `share` of the budget given to prompt-only (window) scores, fixed or scaled by the draft's
doubt (`gate`), the two sources normalised before they are combined (`normalize`), and AdaKV's allocation
(`allocation`). `union` hedges the verification itself: where the target rejected part of the draft's answer, the
draft's whole answer scores the prompt beside the verified one (the max over both, as SpecKV's max over rows), so a
draft that was right in substance but worded differently from the target loses nothing against SpecKV.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import new_cache, shallow_copy, truncate_cache
from ..capture import QueryCapture, check_captured
from ..errors import ConfigError
from ..forward import forward
from ..prompt_state import PromptState, greedy_from
from ..scoring import adaptive_mask, rank, topk_mask
from .base import choice, positive
from .scorer import ScorerKV, Scores


@dataclass
class Lookahead:
    """The rows that score the prompt after verification: queries `(b, H, R, d)` and keys `(b, G, R, d)` per layer
    at positions `n .. n+R-1` (the accepted draft tokens, the rewrites the target accepted, then the target's own),
    and how much of the draft's first answer held."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]
    drafted: int
    accepted: int  # of the draft's first answer
    rows: int
    # the draft's whole first answer, rows and keys as above, when the target rejected part of it (else empty)
    first_queries: dict[int, torch.Tensor] = field(default_factory=dict)
    first_keys: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def agreement(self) -> float:
        """The share of the draft's answer the target accepted (1 when there was nothing to check)."""
        return self.accepted / self.drafted if self.drafted else 1.0


@dataclass
class VeriSpecKV(ScorerKV):
    """SpecKV whose draft answer the target verifies before it scores the prompt (see the module docstring).

    The defaults are what the development study chose (docs/results/robust-speckv.md): the verification with one
    rewrite and 8 target tokens, union, AdaKV's allocation and `window=8`, a window sized for budgets of 64-256.
    With `verify=False, redraft=0, correct=0, union=False, allocation=uniform, window=32` it is SpecKV exactly.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256.
        `window`: the last `window` prompt positions; their queries score every earlier pair, and their own pairs
            are always kept. At least 1, at most the budget. Default 8.
        `kernel`: width of the pooling over positions that spreads a pair's score to its neighbours before the
            top-k; odd. Default 7.
        `pool`: `max` or `avg` pooling. Default `max`.
        `reduction`: how the scores of a KV head's query heads and query rows combine: `max` or `mean`. Default `max`.
        `verify`: the target checks the draft's answer and keeps it up to its first rejected token. Default True.
        `redraft`: rounds in which the draft rewrites its answer from the target's token at the rejection; >= 0.
            Default 1.
        `correct`: target tokens written from the last rejection on (0: none). Default 8.
        `lookahead`: draft tokens; None: the request's `max_new_tokens`. Default None.
        `share`: share of the non-window slots given to the prompt tail's own top pairs, in [0, 1]. Default 0.
        `gate`: how the share is scaled: `none` (as given), `agreement` (times the share of the draft the target
            rejected) or `margin` (times the draft's mean doubt, 1 - top-1 + top-2 probability). Default `none`.
        `normalize`: how the two sources combine: `none` (SpecKV's max over raw attention), `mass` (the mean of each
            source's per-head distribution) or `rank` (the max of each source's rank percentile). Default `none`.
        `allocation`: `uniform` (the top pairs of every KV head) or `adaptive` (AdaKV). Default `adaptive`.
        `alpha`: AdaKV's per-head floor, as a share of the uniform share; in [0, 1]. Default 0.2.
        `union`: the draft's whole first answer scores the prompt too, beside the verified lookahead. Default True.
    """

    window: int = 8
    verify: bool = True
    redraft: int = 1
    correct: int = 8
    lookahead: int | None = None
    share: float = 0.0
    gate: str = "none"
    normalize: str = "none"
    allocation: str = "adaptive"
    alpha: float = 0.2
    union: bool = True
    name = "verispeckv"
    summary = "SpecKV whose draft answer the target verifies; from its first rejected token the target's own score"
    needs_draft = True

    def validate(self) -> None:
        positive(self, "correct", self.correct, minimum=0)
        positive(self, "redraft", self.redraft, minimum=0)
        if self.lookahead is not None:
            positive(self, "lookahead", self.lookahead, minimum=0)
        if isinstance(self.share, bool) or not isinstance(self.share, int | float) or not 0 <= self.share <= 1:
            raise ConfigError(f"{self.name}: share must be in [0, 1], got {self.share!r}")
        choice(self, "gate", self.gate, ("none", "agreement", "margin"))
        choice(self, "normalize", self.normalize, ("none", "mass", "rank"))
        choice(self, "allocation", self.allocation, ("uniform", "adaptive"))
        if self.gate == "agreement" and not self.verify:
            raise ConfigError(f"{self.name}: gate=agreement needs verify=true (the agreement is the target's)")
        for knob in ("correct", "redraft", "union"):
            if getattr(self, knob) and not self.verify:
                raise ConfigError(f"{self.name}: {knob}={getattr(self, knob)} needs verify=true (nothing is rejected "
                                  "without it)")
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
        position, last = n, state.logits  # where the next token goes, and the target's logits that predict it
        rows: list[dict[int, torch.Tensor]] = []
        taken: list[torch.Tensor] = []  # the tokens whose rows are kept, in order
        accepted, rejected, draft_cache = drafted, False, None
        first_queries: dict[int, torch.Tensor] = {}
        first_keys: dict[int, torch.Tensor] = {}
        for round_ in range(self.redraft + 1):
            seen = QueryCapture(rows=tokens.shape[1])
            with state.timings.phase("target_lookahead", target.device):
                logits = forward(target, tokens, state.cache, position, logits=False, every=self.verify, capture=seen)
            check_captured(target, seen)
            good = tokens.shape[1]
            if self.verify:
                # the target's own choice at each token: from the logits before it, then from each token in turn
                wanted = torch.cat([last[:, None], logits[:, :-1]], dim=1).argmax(-1)
                wrong = (wanted[0] != tokens[0].to(wanted.device)).nonzero()
                good = int(wrong[0]) if wrong.numel() else tokens.shape[1]
            if round_ == 0 and good < drafted:  # kept whole before the rejected part leaves the cache
                first_queries = dict(seen.queries)
                first_keys = {i: state.cache.layers[i].keys[:, :, n:n + drafted].clone() for i in seen.queries}
            rows.append({i: q[..., :good, :] for i, q in seen.queries.items()})
            taken.append(tokens[:, :good])
            accepted = good if round_ == 0 else accepted
            position += good
            rejected = good < tokens.shape[1]
            if not rejected:
                break
            last = last if good == 0 else logits[:, good - 1]
            truncate_cache(state.cache, position)
            fix = wanted[:, good:good + 1]
            if round_ == self.redraft or int(fix[0, 0]) in state.eos_ids:
                break
            # the draft rewrites the rest of its answer from the target's token; the next round checks it
            draft_cache = draft_cache or self._draft_cache(state, torch.cat(taken, dim=1))
            truncate_cache(draft_cache, position)
            draft = state.require_draft(self.name)
            with state.timings.phase("draft", draft.device):
                ahead = forward(draft, fix, draft_cache, position)
                room = length - (position - n) - 1
                more = greedy_from(draft, ahead, draft_cache, position + 1, room, state.eos_ids) if room > 0 else None
            tokens = fix if more is None else torch.cat([fix, more.to(fix.device)], dim=1)
        if rejected and self.correct:
            own = QueryCapture(rows=self.correct)
            with state.timings.phase("target_lookahead", target.device):
                # `correct + 1` tokens feed `correct` of them (the last is never fed); fewer when it stops at EOS
                greedy_from(target, last, state.cache, position, self.correct + 1, state.eos_ids, capture=own)
            if own.queries:
                rows.append(own.queries)
        queries = {i: torch.cat([r[i] for r in rows], dim=2) for i in rows[0]}
        count = next(iter(queries.values())).shape[2]
        keys = {i: state.cache.layers[i].keys[:, :, n:n + count].clone() for i in queries}
        truncate_cache(state.cache, n)
        return Lookahead(queries, keys, drafted, accepted, count, first_queries, first_keys)

    @staticmethod
    def _draft_cache(state: PromptState, taken: torch.Tensor):
        """A cache of the draft's own that holds the prompt and the accepted tokens: the one its lookahead left
        (shared, so copied; appends go to buffers of the copy's own), or a prefill when there is none."""
        if state.draft_cache is not None:
            return shallow_copy(state.draft_cache)
        draft, cache = state.require_draft("verispeckv"), new_cache()
        with state.timings.phase("draft", draft.device):
            forward(draft, torch.cat([state.input_ids, taken.to(state.input_ids.device)], dim=1), cache, 0,
                    logits=False)
        return cache

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
        settings = (self.name, length, self.verify, self.redraft, self.correct)
        look = state.scores_for(settings, lambda: self.verified(state, length))
        slots = self.tokens(n) - w
        reserved = round(self.share_of(state, look, length) * slots)
        tail_at = torch.arange(n - w - 1, n)
        rows = look.rows
        columns = n - w - 1
        answers = [(look.queries, look.keys)]  # the lookaheads that score the prompt, each over its own keys
        if self.union and look.first_queries:
            answers.append((look.first_queries, look.first_keys))
        with state.timings.phase("scoring", state.target.device):
            per_layer = []
            for i, q in sorted(state.queries.queries.items()):
                tail_q, scaling = q[..., -(w + 1):, :], state.queries.scaling[i]
                prompt_keys = state.cache.layers[i].keys
                joint = self.normalize == "none" and not reserved  # SpecKV's own reduction over all rows at once
                tail = None if joint and rows else self.layer_scores(tail_q, tail_at, prompt_keys, columns, scaling)
                ahead = None
                for queries, keys in answers if rows else ():
                    at = torch.arange(n, n + queries[i].shape[2])
                    keys = torch.cat([prompt_keys, keys[i].to(prompt_keys.dtype)], dim=2)
                    score = (self.layer_scores(torch.cat([tail_q, queries[i]], dim=2), torch.cat([tail_at, at]),
                                               keys, columns, scaling) if joint
                             else self.layer_scores(queries[i], at, keys, columns, scaling))
                    ahead = score if ahead is None else torch.maximum(ahead, score)
                if joint:
                    per_layer.append(tail if ahead is None else ahead)
                    continue
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
