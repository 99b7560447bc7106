"""PyramidKV: SnapKV scores under per-layer budgets that shrink linearly towards the top (Cai et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..scoring import pyramid_budgets, topk_mask
from .scorer import Scores
from .snapkv import SnapKV


@dataclass
class PyramidKV(SnapKV):
    """SnapKV's scores with budgets that shrink linearly from the bottom layer to the top one, their mean exactly the
    budget.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256. (the mean over layers)
        `window`: the last `window` prompt positions; their queries score every earlier pair, and their own pairs
            are always kept. At least 1, at most the budget. Default 32.
        `kernel`: width of the pooling over positions that spreads a pair's score to its neighbours before the
            top-k; odd. Default 7.
        `pool`: `max` or `avg` pooling. Default `max`.
        `reduction`: how the scores of a KV head's query heads and query rows combine: `max` or `mean`. Default `max`.
        `beta`: the top layer gets `(budget - window) / beta` non-window slots; > 1. Default 20.
    """

    beta: float = 20.0
    name = "pyramidkv"
    summary = "SnapKV scores, budgets shrinking linearly from bottom to top layer with the same mean"

    def validate(self) -> None:
        if not self.beta >= 1:
            raise ConfigError(f"{self.name}: beta must be >= 1, got {self.beta}")
        super().validate()

    def allocate(self, scores: Scores, slots: int, n: int) -> list[torch.Tensor]:
        candidates = scores.per_layer[0].shape[-1]
        budgets = pyramid_budgets(slots, len(scores.per_layer), self.beta, candidates)
        return [topk_mask(s, k, n) for s, k in zip(scores.per_layer, budgets, strict=True)]
