"""SnapKV: the prompt's last `window` queries vote for the KV pairs to keep (Li et al., 2024)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..draft import PromptState
from .scorer import ScorerKV, Scores


@dataclass
class SnapKV(ScorerKV):
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
