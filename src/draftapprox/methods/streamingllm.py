"""StreamingLLM: keep the first `sinks` tokens (attention sinks) and the most recent ones (Xiao et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..capture import decoder_layers
from ..errors import ConfigError
from ..prompt_state import PromptState
from .base import KVMethod, KVSelection, positive


@dataclass
class StreamingLLM(KVMethod):
    """The first `sinks` prompt positions (attention sinks) and the most recent ones, up to the budget.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256.
        `sinks`: leading positions always kept, at least 0 and below the budget. Default 4.
    """

    sinks: int = 4
    name = "streamingllm"
    summary = "first `sinks` tokens + the most recent ones; no scores"

    def validate(self) -> None:
        positive(self, "sinks", self.sinks, minimum=0)
        if isinstance(self.budget, int) and self.sinks >= self.budget:
            raise ConfigError(f"{self.name}: sinks={self.sinks} must be smaller than the budget {self.budget}")
        super().validate()

    def select(self, state: PromptState) -> KVSelection:
        n, budget = state.n, self.tokens(state.n)
        sinks = min(self.sinks, budget - 1)
        heads = state.target.config.get_text_config().num_key_value_heads
        mask = torch.zeros(state.input_ids.shape[0], heads, n, dtype=torch.bool)
        mask[..., :sinks] = True
        mask[..., n - (budget - sinks):] = True
        return KVSelection([mask] * len(decoder_layers(state.target)))
