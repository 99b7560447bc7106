"""RecencyPC: keep the last `budget` prompt tokens; a sanity floor for prompt compression."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..draft import PromptState
from .base import PromptMethod


@dataclass
class RecencyPC(PromptMethod):
    name = "recencypc"
    summary = "the last `budget` prompt tokens (floor)"

    def select(self, state: PromptState) -> torch.Tensor:
        n, budget = state.n, min(self.tokens(state.n), state.n)
        return torch.arange(n - budget, n).expand(state.input_ids.shape[0], -1)
