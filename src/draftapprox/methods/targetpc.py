"""TargetPC: SpecPC's selection scored by the target's own window attention; isolates what the draft adds."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from ..prompt_state import PromptState
from .specpc import SpecPC


@dataclass
class TargetPC(SpecPC):
    """SpecPC's selection scored by the target's own attention instead of the draft's: what the draft costs in
    accuracy, isolated.

    Knobs:
        `budget`: prompt tokens kept, an int; or a float in (0, 1], that share of the prompt (never below `window`).
            A budget at or above the prompt keeps it whole. Default 256.
        `keep_positions`: the kept tokens keep their original position ids (the target continues from the prompt's
            length) instead of being renumbered 0..C-1 as the reference does. Default False.
        `window`: the last `window` prompt tokens, whose queries score the prompt; always kept. Default 64.
        `lookahead`: target tokens written whose queries also score; 1: the prefill alone. Default 1.
        `pool`: `max` or `avg` pooling. Default `max`.
        `kernel`: width of the pooling over positions; odd. Default 64.
        `neighbors`: tokens kept on each side of a chosen one; None: `kernel`. Default None.
        `reduction`: how layers, heads and rows combine: `max` or `mean`. Default `max`.
        `start_layer`: the first target layer whose attention counts. Default 8.
        `weighted`: window rows weighted 0..1 by recency. Default True.
    """
    name = "targetpc"
    summary = "SpecPC's selection scored by the target itself (no draft)"
    needs_draft = False
    needs_target = True

    @property
    def rows(self) -> int:
        """Without lookahead tokens its window rows are those of the target's own prefill, so a shared prefill
        that captures them serves it too (`prompt_state.token_scores`)."""
        return self.window if self.lookahead <= 1 else 0

    def scorer_model(self, state: PromptState) -> PreTrainedModel:
        return state.target
