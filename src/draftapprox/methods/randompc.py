"""RandomPC: the last `window` tokens (where the question usually is) plus uniformly random others; a floor
that isolates the value of SpecPC's scores from that of its window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prompt_state import PromptState
from .base import PromptMethod, positive


@dataclass
class RandomPC(PromptMethod):
    """The last `window` prompt tokens plus others drawn at random: the floor a prompt method must beat.

    Knobs:
        `budget`: prompt tokens kept, an int; or a float in (0, 1], that share of the prompt (never below `window`).
            A budget at or above the prompt keeps it whole. Default 256.
        `keep_positions`: the kept tokens keep their original position ids (the target continues from the prompt's
            length) instead of being renumbered 0..C-1 as the reference does. Default False.
        `window`: the last tokens always kept. Default 64.
        `seed`: the draw's seed (the same prompt and seed keep the same tokens). Default 0.
    """
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
