"""RecencyPC: keep the last `budget` prompt tokens; a sanity floor for prompt compression."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prompt_state import PromptState
from .base import PromptMethod


@dataclass
class RecencyPC(PromptMethod):
    """The last `budget` prompt tokens: the floor a prompt method must beat.

    Knobs:
        `budget`: prompt tokens kept, an int; or a float in (0, 1], that share of the prompt (never below `window`).
            A budget at or above the prompt keeps it whole. Default 256.
        `keep_positions`: the kept tokens keep their original position ids (the target continues from the prompt's
            length) instead of being renumbered 0..C-1 as the reference does. Default False.
    """
    name = "recencypc"
    summary = "the last `budget` prompt tokens (floor)"

    def select(self, state: PromptState) -> torch.Tensor:
        n, budget = state.n, min(self.tokens(state.n), state.n)
        return torch.arange(n - budget, n).expand(state.input_ids.shape[0], -1)
