"""LAQ (lookahead queries, "LAQ++" in the paper): SpecKV with the target as its own drafter. The target writes its
approximate answer from a SnapKV-compressed cache, and that answer then scores the full prompt cache as the draft's
answer does in SpecKV. It isolates what a *separate* draft model buys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import compress_cache
from ..errors import ConfigError
from ..prompt_state import PromptState, greedy_from
from .snapkv import SnapKV
from .speckv import SpecKV


@dataclass
class LAQ(SpecKV):
    """SpecKV whose lookahead is the target's own answer, decoded from a SnapKV cache at the same budget, window,
    kernel, pool and reduction (no draft); the SpecKV stage is unchanged.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256.
        `window`: the last `window` prompt positions; their queries score every earlier pair, and their own pairs
            are always kept. At least 1, at most the budget. Default 32.
        `kernel`: width of the pooling over positions that spreads a pair's score to its neighbours before the
            top-k; odd. Default 7.
        `pool`: `max` or `avg` pooling. Default `max`.
        `reduction`: how the scores of a KV head's query heads and query rows combine: `max` or `mean`. Default `max`.
        `lookahead`: tokens the target writes from its SnapKV cache; None: the request's `max_new_tokens`.
            Default None.
        `sparse_prefill`, `prefill_window`, `prefill_vertical`: SpecKV's; refused here (the self-lookahead
            decodes from the dense prefill).
    """

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
