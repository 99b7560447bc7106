"""AdaKV: any scorer's pairs chosen jointly across the KV heads of a layer, so heads get different budgets
(Feng et al., 2024). The cache really holds the ragged heads (`cache.HeadwiseLayer`), nothing is just masked."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import ConfigError
from ..prompt_state import PromptState
from ..scoring import adaptive_mask
from .base import KVMethod, KVSelection
from .scorer import ScorerKV, Scores, select_with
from .snapkv import SnapKV


@dataclass
class AdaKV(KVMethod):
    """A scorer's pairs chosen jointly across a layer's KV heads, so heads keep different numbers of pairs; the cache
    holds them ragged (`cache.HeadwiseLayer`). Each layer keeps exactly KV heads x budget pairs.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256.
        `scorer`: the KV method whose scores are allocated (its own budget is ignored). Default `SnapKV()`.
        `alpha`: each head's floor, as a share of the uniform share (kvpress's `alpha_safeguard`); in [0, 1].
            Default 0.2.
    """

    scorer: ScorerKV = field(default_factory=SnapKV)
    alpha: float = 0.2
    name = "adakv"
    summary = "wrapper: a scorer's pairs picked jointly over a layer's KV heads (per-head budgets, alpha floor)"

    def validate(self) -> None:
        if not isinstance(self.scorer, ScorerKV):
            raise ConfigError(f"{self.name}: scorer must be an attention-scored KV method, got {self.scorer!r}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"{self.name}: alpha must be in [0, 1], got {self.alpha}")
        super().validate()

    @property
    def window(self) -> int:
        return self.scorer.window

    @property
    def needs_draft(self) -> bool:  # type: ignore[override]
        return self.scorer.needs_draft

    @property
    def rows(self) -> int:
        return self.scorer.rows

    def prefills(self, n: int) -> bool:
        return self.scorer.prefills(n)

    def select(self, state: PromptState) -> KVSelection:
        return select_with(self, state, self.scorer.scores, self.allocate)

    def allocate(self, scores: Scores, slots: int, n: int) -> list[torch.Tensor]:
        return [adaptive_mask(s, slots, self.alpha, n) for s in scores.per_layer]

    @classmethod
    def knobs(cls):
        return [f for f in super().knobs() if f.name != "scorer"]
