"""SpecPrefill (Liu et al., 2025), a baseline of the paper: the draft's attention from a few lookahead tokens ranks
chunks of the prompt; the target runs on the kept chunks at their original position ids."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prompt_state import PromptState, token_scores
from ..scoring import chunk_select, pool1d
from .base import PromptMethod, odd_kernel, positive


@dataclass
class SpecPrefill(PromptMethod):
    """Prompt chunks ranked by the draft's lookahead attention (the authors' SpecPrefill), kept tokens at their
    original positions.

    Per layer and head, the softmax over the prompt of the last prompt position and the lookahead tokens is
    average-pooled; the max over layers and heads, the mean over lookahead steps; chunks are ranked by mean score.
    The budget is cut to exactly `C` tokens (the authors keep whole chunks, ceil(C / chunk) of them).

    Knobs:
        `budget`: prompt tokens kept, an int; or a float in (0, 1], that share of the prompt . A budget at or above
            the prompt keeps it whole. Default 256.
        `lookahead`: draft tokens written whose queries score the prompt (`look_ahead_cnt`). Default 8.
        `kernel`: width of the average pooling (`pool_kernel_size`); odd. Default 13.
        `chunk`: tokens a ranked chunk holds (`chunk_size`). Default 32.
        `keep_positions`: the kept tokens keep their original position ids (the target continues from the prompt's
            length) instead of being renumbered 0..C-1 as the reference does. Default True.
    """

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

    def select(self, state: PromptState) -> torch.Tensor:
        model = state.require_draft(self.name)

        def layer_score(probs: torch.Tensor) -> torch.Tensor:  # (b, G, H/G, rows, n) -> (b, rows, n)
            return pool1d(probs, "avg", self.kernel).amax(dim=(1, 2))

        def compute() -> torch.Tensor:  # max over layers, mean over lookahead steps
            return token_scores(state, model, 1, self.lookahead, 0, layer_score, context_only=True).amax(0).mean(1)

        scores = state.scores_for((self.name, self.lookahead, self.kernel), compute)
        with state.timings.phase("scoring", model.device):
            return chunk_select(scores, min(self.tokens(state.n), state.n), self.chunk)
