"""SpecPrefill (Liu et al., 2025), a baseline of the paper: the draft's attention from a few lookahead tokens ranks
chunks of the prompt; the target runs on the kept chunks at their original position ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..draft import PromptState, token_scores
from ..scoring import chunk_select, pool1d
from .base import PromptMethod, odd_kernel, positive


@dataclass
class SpecPrefill(PromptMethod):
    """Defaults are the authors' released configuration (`look_ahead_cnt=8`, `pool_kernel_size=13`,
    `chunk_size=32`): per layer and head, softmax over the prompt of the last prompt position and the lookahead
    tokens, average-pooled; max over layers and heads, mean over lookahead steps; chunks ranked by mean score.
    The budget is cut to exactly `C` tokens (the authors keep whole chunks, ceil(C / chunk) of them)."""

    lookahead: int = 8
    kernel: int = 13
    chunk: int = 32
    keep_positions: bool = True
    name = "specprefill"
    summary = "draft lookahead attention ranks prompt chunks; kept tokens keep their position ids"
    needs_draft = True

    def validate(self) -> None:
        positive(self, "lookahead", self.lookahead)
        odd_kernel(self, self.kernel)
        positive(self, "chunk", self.chunk)
        super().validate()

    def scorer_model(self, state: PromptState) -> PreTrainedModel:
        return state.require_draft(self.name)

    def select(self, state: PromptState) -> torch.Tensor:
        model = self.scorer_model(state)

        def layer_score(probs: torch.Tensor) -> torch.Tensor:  # (b, G, H/G, rows, n) -> (b, rows, n)
            return pool1d(probs, "avg", self.kernel).amax(dim=(1, 2))

        memo = (self.name, self.lookahead, self.kernel)  # budget-independent: shared by several budgets
        if memo not in state.token_scores:
            per_layer = token_scores(state, model, 1, self.lookahead, 0, layer_score, context_only=True)
            state.token_scores[memo] = per_layer.amax(0).mean(1)
        with state.timings.phase("scoring", model.device):
            return chunk_select(state.token_scores[memo], min(self.tokens(state.n), state.n), self.chunk)
