"""Shared base of the attention-scored KV methods: score candidates per KV head, then allocate the budget.

Splitting `scores` from `allocate` is what lets one allocation (uniform, pyramid, adaptive) serve every scorer
(prompt tail for SnapKV, prompt tail + draft answer for SpecKV), as kvpress does with its ScorerPress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from ..prompt_state import PromptState
from ..scoring import kv_head_scores, topk_mask, window_probs
from .base import KVMethod, KVSelection, choice, odd_kernel, positive


@dataclass
class Scores:
    """Candidate scores `(b, G, m)` per layer for positions `0..m-1`; `window` positions are always kept."""

    per_layer: list[torch.Tensor]
    window: range
    refeed: bool
    cache: DynamicCache | None = None  # the method's own prefill cache, when it ran one


@dataclass
class ScorerKV(KVMethod):
    """Defaults are the paper's comparison settings: `window=32`, `kernel=7`, `pool=max`, `reduction=max`."""

    window: int = 32
    kernel: int = 7
    pool: str = "max"
    reduction: str = "max"

    def validate(self) -> None:
        positive(self, "window", self.window)
        odd_kernel(self, self.kernel)
        choice(self, "pool", self.pool, ("max", "avg"))
        choice(self, "reduction", self.reduction, ("max", "mean"))
        super().validate()

    def scores(self, state: PromptState) -> Scores:
        raise NotImplementedError

    def layer_scores(self, queries: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, columns: int,
                     scaling: float) -> torch.Tensor:
        probs = window_probs(queries, positions, keys, columns, scaling)
        return kv_head_scores(probs, self.reduction, self.pool, self.kernel)

    def allocate(self, scores: Scores, slots: int, n: int) -> list[torch.Tensor]:
        """Uniform: the top `slots` candidates of every KV head in every layer."""
        return [topk_mask(s, slots, n) for s in scores.per_layer]

    def select(self, state: PromptState) -> KVSelection:
        return select_with(self, state, self.scores, self.allocate)


def select_with(method: KVMethod, state: PromptState, scorer: Callable[[PromptState], Scores],
                allocate: Callable[[Scores, int, int], list[torch.Tensor]]) -> KVSelection:
    """Resolve the budget, score, give `budget - window` slots to the allocation, and add the window."""
    budget = method.tokens(state.n)
    method.check_window(budget)
    scores = scorer(state)
    with state.timings.phase("scoring", state.target.device):
        keep = allocate(scores, budget - len(scores.window), state.n)
        for mask in keep:
            mask[..., scores.window.start:scores.window.stop] = True
    return KVSelection(keep, scores.refeed, scores.cache)
