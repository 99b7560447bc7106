"""SnapKV: the prompt's last `window` queries vote for the KV pairs to keep (Li et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..prompt_state import PromptState
from .scorer import ScorerKV, Scores


@dataclass
class SnapKV(ScorerKV):
    """The top pairs per KV head by the attention the prompt's tail window pays them (SpecKV without a lookahead).

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256.
        `window`: the last `window` prompt positions; their queries score every earlier pair, and their own pairs
            are always kept. At least 1, at most the budget. Default 32.
        `kernel`: width of the pooling over positions that spreads a pair's score to its neighbours before the
            top-k; odd. Default 7.
        `pool`: `max` or `avg` pooling. Default `max`.
        `reduction`: how the scores of a KV head's query heads and query rows combine: `max` or `mean`. Default `max`.
    """

    name = "snapkv"
    summary = "prompt-tail window attention picks the top pairs per KV head (SpecKV without lookahead)"

    @property
    def rows(self) -> int:
        return self.window

    def scores(self, state: PromptState) -> Scores:
        n, w = state.n, self.window
        positions = torch.arange(n - w, n)
        with state.timings.phase("scoring", state.target.device):
            per_layer = [
                self.layer_scores(q[..., -w:, :], positions, state.cache.layers[i].keys, n - w,
                                  state.queries.scaling[i])
                for i, q in sorted(state.queries.queries.items())
            ]
        return Scores(per_layer, range(n - w, n), refeed=False)
