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
    """`beta`: the top layer gets `(C - window) / beta` non-window slots; the mean over layers stays exactly C."""

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
