"""RandomPC: the last `window` tokens (where the question usually is) plus uniformly random others; a floor
that isolates the value of SpecPC's scores from that of its window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..draft import PromptState
from .base import PromptMethod, positive


@dataclass
class RandomPC(PromptMethod):
    window: int = 64
    seed: int = 0
    name = "randompc"
    summary = "the last `window` tokens + random others, seeded (floor)"

    def validate(self) -> None:
        positive(self, "window", self.window, minimum=0)
        super().validate()

    def select(self, state: PromptState) -> torch.Tensor:
        n, budget = state.n, min(self.tokens(state.n), state.n)
        self.check_window(budget)
        generator = torch.Generator().manual_seed(self.seed)
        rows = []
        for _ in range(state.input_ids.shape[0]):
            head = torch.randperm(n - self.window, generator=generator)[: budget - self.window]
            rows.append(torch.cat([head, torch.arange(n - self.window, n)]).sort().values)
        return torch.stack(rows)
