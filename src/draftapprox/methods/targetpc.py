"""TargetPC: SpecPC's selection scored by the target's own window attention; isolates what the draft adds."""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel

from ..draft import PromptState
from .specpc import SpecPC


@dataclass
class TargetPC(SpecPC):
    name = "targetpc"
    summary = "SpecPC's selection scored by the target itself (no draft)"
    needs_draft = False
    needs_target = True

    @property
    def rows(self) -> int:
        """Without lookahead tokens its window rows are those of the target's own prefill, so a shared prefill
        that captures them serves it too (`draft.token_scores`)."""
        return self.window if self.lookahead <= 1 else 0

    def scorer_model(self, state: PromptState) -> PreTrainedModel:
        return state.target
