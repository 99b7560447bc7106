"""SpecPC: the draft's own attention ranks prompt tokens; the target (any engine) receives only the important ones
with their neighbours (Galim et al., 2026, section 4.2)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..prompt_state import PromptState, token_scores
from ..scoring import reduce, specpc_select
from .base import PromptMethod, choice, positive


@dataclass
class SpecPC(PromptMethod):
    """The draft's attention over the prompt ranks its tokens; the top ones and their neighbours reach the target,
    which can be any engine.

    Knobs:
        `budget`: prompt tokens kept, an int; or a float in (0, 1], that share of the prompt (never below `window`).
            A budget at or above the prompt keeps it whole. Default 256.
        `keep_positions`: the kept tokens keep their original position ids (the target continues from the prompt's
            length) instead of being renumbered 0..C-1 as the reference does. Default False.
        `window`: the last `window` prompt tokens; their queries (and the lookahead's) score the prompt, and they
            are always kept. Default 64.
        `lookahead`: draft tokens written, whose queries also score the prompt; 1: the prefill's attention alone,
            no decoding step (the reference default). Default 1.
        `pool`: `max` or `avg` pooling. Default `max`.
        `kernel`: width of the pooling over positions; odd. Default 64.
        `neighbors`: tokens kept on each side of a chosen one; None: `kernel`. Default None.
        `reduction`: how layers, heads and query rows combine: `max` or `mean`. Default `max`.
        `start_layer`: the first draft layer whose attention counts (the lowest ones attend broadly). Default 8.
        `weighted`: window rows weighted 0..1 by recency, lookahead rows 1. Default True.
    """

    window: int = 64
    lookahead: int = 1
    pool: str = "max"
    kernel: int = 64
    neighbors: int | None = None
    reduction: str = "max"
    start_layer: int = 8
    weighted: bool = True
    name = "specpc"
    summary = "draft attention ranks prompt tokens; top tokens and their neighbours go to the target"
    needs_draft = True

    def validate(self) -> None:
        positive(self, "window", self.window)
        positive(self, "lookahead", self.lookahead)
        positive(self, "kernel", self.kernel)
        if self.neighbors is not None:
            positive(self, "neighbors", self.neighbors, minimum=0)
        positive(self, "start_layer", self.start_layer, minimum=0)
        choice(self, "pool", self.pool, ("max", "avg"))
        choice(self, "reduction", self.reduction, ("max", "mean"))
        super().validate()

    def scorer_model(self, state: PromptState) -> PreTrainedModel:
        return state.require_draft(self.name)

    def select(self, state: PromptState) -> torch.Tensor:
        budget = self.tokens(state.n)
        self.check_window(budget)
        model = self.scorer_model(state)
        phase = "draft" if model is state.draft else "target_scoring"
        w = min(self.window, state.n)

        def layer_score(probs: torch.Tensor) -> torch.Tensor:  # (b, G, H/G, rows, n) -> (b, n)
            if self.weighted:  # window rows weighted 0..1, lookahead rows 1
                weights = torch.ones(probs.shape[3], device=probs.device)
                weights[:w] = torch.linspace(0, 1, w, device=probs.device)
                probs = probs * weights[:, None]
            return reduce(probs, (1, 2, 3), self.reduction)

        def compute() -> torch.Tensor:
            per_layer = token_scores(state, model, self.window, self.lookahead, self.start_layer, layer_score, phase)
            return reduce(per_layer, (0,), self.reduction)

        settings = (self.name, self.window, self.lookahead, self.start_layer, self.weighted, self.reduction)
        scores = state.scores_for(settings, compute)
        neighbors = self.kernel if self.neighbors is None else self.neighbors
        with state.timings.phase("scoring", model.device):
            return specpc_select(scores, budget, self.window, self.kernel, neighbors, self.pool)
