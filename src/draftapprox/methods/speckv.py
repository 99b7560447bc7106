"""SpecKV: the draft writes an approximate answer; the target scores prompt KV pairs by the attention that the
prompt's tail and that answer pay to them (Galim et al., 2026, section 4.1)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..cache import new_cache, truncate_cache
from ..capture import QueryCapture, check_captured
from ..forward import forward
from ..prompt_state import PromptState
from ..sparse import VerticalSlash
from .base import positive
from .scorer import ScorerKV, Scores


@dataclass
class SpecKV(ScorerKV):
    """The draft writes an approximate answer; the top pairs per KV head by the attention that the prompt's tail and
    that answer pay them are kept.

    Window queries are the last `window + 1` prompt positions and every draft token; candidates are positions
    `< n - window - 1`; positions `n-window-1 .. n-2` are kept and the last prompt token is fed again on the
    compressed cache. The draft tokens run through the target on top of the shared prompt cache (the cheaper
    order the spec allows) and their pairs are discarded afterwards.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256.
        `window`: the last `window` prompt positions; their queries score every earlier pair, and their own pairs
            are always kept. At least 1, at most the budget. Default 32.
        `kernel`: width of the pooling over positions that spreads a pair's score to its neighbours before the
            top-k; odd. Default 7.
        `pool`: `max` or `avg` pooling. Default `max`.
        `reduction`: how the scores of a KV head's query heads and query rows combine: `max` or `mean`. Default `max`.
        `lookahead`: draft tokens whose queries also score the prompt (the draft's greedy answer); None: the
            request's `max_new_tokens`, as the reference. Default None.
        `sparse_prefill`: the paper's sparse prefill: for prompts longer than `prefill_window + prefill_vertical`,
            the target prefills prompt and draft tokens in one forward whose attention is vertical-slash sparse
            (`sparse.VerticalSlash`), its columns picked per layer from these same scores. Default False.
        `prefill_window`: the slash (recent) positions every query of that prefill sees. Default 2048.
        `prefill_vertical`: the vertical (chosen) columns every query of that prefill sees. Default 2048.
    """

    lookahead: int | None = None
    sparse_prefill: bool = False
    prefill_window: int = 2048
    prefill_vertical: int = 2048
    name = "speckv"
    summary = "draft answer + prompt tail score the target's KV pairs; top pairs per KV head are kept"
    needs_draft = True

    def validate(self) -> None:
        if self.lookahead is not None:
            positive(self, "lookahead", self.lookahead, minimum=0)
        positive(self, "prefill_window", self.prefill_window)
        positive(self, "prefill_vertical", self.prefill_vertical)
        super().validate()

    def prefills(self, n: int) -> bool:
        return not (self.sparse_prefill and n > self.prefill_window + self.prefill_vertical)

    @property
    def rows(self) -> int:
        return self.window + 1

    def lookahead_tokens(self, state: PromptState, length: int) -> torch.Tensor:
        """The approximate answer whose attention scores the prompt: the draft's greedy tokens."""
        return state.lookahead(length)

    def scores(self, state: PromptState) -> Scores:
        n, w = state.n, self.window
        length = state.max_new_tokens if self.lookahead is None else self.lookahead
        tokens = self.lookahead_tokens(state, length) if length > 0 else state.input_ids[:, :0]
        positions = torch.arange(n - w - 1, n + tokens.shape[1])
        if not self.prefills(n):
            return self._sparse_prefill_scores(state, tokens, positions)
        extra = QueryCapture(rows=max(tokens.shape[1], 1))
        target = state.target
        if tokens.shape[1]:
            with state.timings.phase("target_lookahead", target.device):
                forward(target, tokens, state.cache, n, logits=False, capture=extra)
            check_captured(target, extra)
        with state.timings.phase("scoring", target.device):
            per_layer = []
            for i, q in sorted(state.queries.queries.items()):
                rows = q[..., -(w + 1):, :]
                if tokens.shape[1]:
                    rows = torch.cat([rows, extra.queries[i]], dim=2)
                keys = state.cache.layers[i].keys
                per_layer.append(self.layer_scores(rows, positions, keys, n - w - 1, state.queries.scaling[i]))
        truncate_cache(state.cache, n)
        return Scores(per_layer, range(n - w - 1, n - 1), refeed=True)

    def _sparse_prefill_scores(self, state: PromptState, tokens: torch.Tensor, positions: torch.Tensor) -> Scores:
        """One sparse forward of prompt + draft tokens; each layer's scores choose its vertical columns and are
        the scores selection then uses (computed once)."""
        n, rows = state.n, positions.numel()

        def columns(layer: int, query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
            return self.layer_scores(query[..., -rows:, :], positions, keys, n - self.window - 1, scaling)

        plan = VerticalSlash(self.prefill_vertical, self.prefill_window, columns)
        cache = new_cache()
        ids = torch.cat([state.input_ids, tokens.to(state.input_ids.device)], dim=1)
        with state.timings.phase("target_prefill", state.target.device):
            forward(state.target, ids, cache, 0, logits=False, sparse=plan)
        truncate_cache(cache, n)
        return Scores([plan.scores[i] for i in sorted(plan.scores)], range(n - self.window - 1, n - 1), refeed=True,
                      cache=cache)
