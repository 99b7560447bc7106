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

    def scorer_model(self, state: PromptState) -> PreTrainedModel:
        return state.target
