"""LAQ (lookahead queries, "LAQ++" in the paper): SpecKV with the target as its own drafter. The target writes its
approximate answer from a SnapKV-compressed cache, and that answer then scores the full prompt cache as the draft's
answer does in SpecKV. It isolates what a *separate* draft model buys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import compress_cache
from ..draft import PromptState, greedy_from
from ..errors import ConfigError
from .snapkv import SnapKV
from .speckv import SpecKV


@dataclass
class LAQ(SpecKV):
    """The self-lookahead decodes `lookahead` tokens (None: max_new_tokens) from SnapKV at the same budget,
    window, kernel, pool and reduction; the SpecKV stage is unchanged."""

    name = "laq"
    summary = "SpecKV with the target's own answer from a SnapKV cache as the lookahead (no draft)"
    needs_draft = False

    def validate(self) -> None:
        if self.sparse_prefill:
            raise ConfigError(f"{self.name}: sparse_prefill is not available (the self-lookahead decodes from the "
                              "dense prefill, so there is no lookahead before it)")
        super().validate()

    def lookahead_tokens(self, state: PromptState, length: int) -> torch.Tensor:
        snap = SnapKV(budget=self.budget, window=self.window, kernel=self.kernel, pool=self.pool,
                      reduction=self.reduction)
        keep = snap.select(state).keep
        target = state.target
        with state.timings.phase("self_lookahead", target.device):
            cache = compress_cache(state.cache, keep)
            return greedy_from(target, state.logits, cache, state.n, length, state.eos_ids, compressed=True)
