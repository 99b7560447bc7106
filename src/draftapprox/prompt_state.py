"""A prompt's shared state, which every method reads: the target's prefill and captured queries, and what the
draft contributes (its greedy lookahead tokens, its cache, its attention over the prompt).

One draft run serves every method that agrees on it: `PromptState.lookahead` memoises the greedy tokens, so SpecPC
(writing `L` tokens while it records attention), SpecKV, Ada-SpecKV and SpecKV-PC on the same prompt pay once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from transformers import DynamicCache, PreTrainedModel

from .cache import cache_length, new_cache
from .capture import QueryCapture, check_captured, decoder_layers
from .errors import ConfigError
from .forward import Timings, forward
from .scoring import window_probs

T = TypeVar("T")


@dataclass
class PromptState:
    """One prompt and everything computed on it once, shared by all methods applied to it.

    The target fields (`cache`, `queries`, `logits`) are filled by `generation.prefill`; `cache` then holds the n
    prompt positions uncompressed and must be left that way (methods build new caches from it).
    """

    draft: PreTrainedModel | None
    target: PreTrainedModel
    input_ids: torch.Tensor
    max_new_tokens: int
    eos_ids: frozenset[int] = frozenset()
    timings: Timings = field(default_factory=Timings)
    cache: DynamicCache | None = None
    queries: QueryCapture | None = None
    logits: torch.Tensor | None = None
    _lookahead: tuple[torch.Tensor, bool, list[float]] | None = None  # (tokens (b, L), stopped at EOS, margins)
    draft_cache: DynamicCache | None = None  # the draft's cache after its lookahead (prompt + tokens but the last)
    _scores: dict[tuple, object] = field(default_factory=dict)  # methods' memoised scores, by settings

    @property
    def n(self) -> int:
        return self.input_ids.shape[1]

    def require_draft(self, method: str) -> PreTrainedModel:
        if self.draft is None:
            raise ConfigError(f"{method} needs a draft model; load a pair with a draft")
        return self.draft

    def lookahead(self, length: int) -> torch.Tensor:
        """The draft's first `length` greedy tokens after the prompt (fewer if it stops at EOS)."""
        if self._lookahead is not None:
            tokens, stopped, _ = self._lookahead
            if stopped or tokens.shape[1] >= length:
                return tokens[:, :length]
        draft = self.require_draft("lookahead")
        margins: list[float] = []
        cache = new_cache()
        with self.timings.phase("draft", draft.device):
            tokens = greedy(draft, self.input_ids, cache, length, self.eos_ids, margins=margins)
        self.remember_lookahead(tokens, length, margins, cache)
        return tokens

    def draft_chain(self) -> tuple[list[int], DynamicCache] | None:
        """The draft's lookahead tokens (of the first sequence) and its cache holding the prompt and every one of
        them but the last, where a method left both; None otherwise. Speculative decoding continues from there."""
        if self.draft_cache is None or self._lookahead is None:
            return None
        tokens = self._lookahead[0][0].tolist()
        if not tokens or cache_length(self.draft_cache) != self.n + len(tokens) - 1:
            return None
        return tokens, self.draft_cache

    def lookahead_margins(self, length: int) -> torch.Tensor:
        """The draft's confidence in each of its first `length` lookahead tokens: the probability of its choice
        minus that of its runner-up, `(L,)` (0: a coin toss, 1: certain)."""
        tokens = self.lookahead(length)
        return torch.tensor(self._lookahead[2][:tokens.shape[1]])

    def release(self) -> None:
        """Drop what only selection needed (the uncompressed prefill cache, its captured queries, the draft's cache,
        memoised scores) once a request's own cache is built: a request that keeps its state while it decodes must
        not keep the full prompt's KV with it."""
        self.cache = self.queries = self.draft_cache = None
        self._scores = {}

    def scores_for(self, settings: tuple, compute: Callable[[], T]) -> T:
        """A method's scores (or what they are made from), computed once per prompt and `settings`: they do not
        depend on the budget, so several budgets on one prompt pay for one scoring run."""
        if settings not in self._scores:
            self._scores[settings] = compute()
        return self._scores[settings]

    def remember_lookahead(self, tokens: torch.Tensor, asked: int, margins: list[float],
                           cache: DynamicCache | None = None) -> None:
        self._lookahead = (tokens, tokens.shape[1] < asked, margins)
        self.draft_cache = cache


@torch.inference_mode()
def greedy(model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache, length: int,
           eos_ids: frozenset[int], capture: QueryCapture | None = None, margins: list[float] | None = None
           ) -> torch.Tensor:
    """Greedy tokens from a dense prefill and one cached forward per token; never recomputes the prompt."""
    logits = forward(model, input_ids, cache, 0, capture=capture)
    return greedy_from(model, logits, cache, input_ids.shape[1], length, eos_ids, capture, margins=margins)


@torch.inference_mode()
def greedy_from(model: PreTrainedModel, logits: torch.Tensor, cache: DynamicCache, position: int, length: int,
                eos_ids: frozenset[int], capture: QueryCapture | None = None, compressed: bool = False,
                margins: list[float] | None = None) -> torch.Tensor:
    """Greedy tokens `(b, <= length)` continuing from `logits`, the next one fed at `position`; stops at EOS.

    The last token is not fed back (nothing needs its KV), so `length` tokens cost `length - 1` forwards.
    `compressed`: `cache` is a compressed cache (LAQ's self-lookahead decodes from one).
    `margins`: receives each token's top-1 minus top-2 probability (of the first sequence), the model's confidence.
    """
    tokens = []
    for step in range(length):
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        if margins is not None:
            top = logits[0].float().softmax(-1).topk(2).values
            margins.append(float(top[0] - top[1]))
        if int(token[0, 0]) in eos_ids or step == length - 1:
            break
        logits = forward(model, token, cache, position + step, capture=capture, compressed=compressed)
    return torch.cat(tokens, dim=1)


def token_scores(state: PromptState, model: PreTrainedModel, window: int, lookahead: int, start_layer: int,
                 layer_score: Callable[[torch.Tensor], torch.Tensor], phase: str = "draft",
                 context_only: bool = False) -> torch.Tensor:
    """Per-layer token scores `(layers, ...)` from `model`'s attention over the prompt (spec 3, step 1).

    Query rows are the last `window` prompt positions and every lookahead token after the first (the first is
    predicted by the last prompt position); `layer_score` reduces one layer's probabilities
    `(b, G, H/G, rows, n)` float32, one layer at a time so that no layer's probabilities outlive it.
    `context_only`: the softmax runs over prompt keys alone (SpecPrefill), not the lookahead tokens' keys too.
    """
    n = state.n
    layers = len(decoder_layers(model))
    if not 0 <= start_layer < layers:
        raise ConfigError(f"start_layer={start_layer} is outside the model's {layers} layers")
    w = min(window, n)
    wanted = range(start_layer, layers)
    shared = state.queries if model is state.target and lookahead <= 1 and state.cache is not None else None
    if shared is not None and shared.rows >= w:
        # the target's shared prefill (generation.prefill) already holds these query rows and the keys
        queries = {i: q[..., -w:, :] for i, q in shared.queries.items() if i in wanted}
        scaling, cache = shared.scaling, state.cache
    else:
        capture = QueryCapture(rows=w + max(lookahead, 1) - 1, layers=frozenset(wanted))
        cache = new_cache()
        with state.timings.phase(phase, model.device):
            if lookahead <= 1:
                forward(model, state.input_ids, cache, 0, logits=False, capture=capture)
            else:
                margins: list[float] = []
                tokens = greedy(model, state.input_ids, cache, lookahead, state.eos_ids, capture=capture,
                                margins=margins)
                if model is state.draft:
                    state.remember_lookahead(tokens, lookahead, margins, cache)
        check_captured(model, capture)
        queries, scaling = capture.queries, capture.scaling
    with state.timings.phase("scoring", model.device):
        per_layer = []
        for layer, rows in queries.items():
            positions = torch.arange(n - w, n - w + rows.shape[2])
            keys = cache.layers[layer].keys[:, :, :n + rows.shape[2] - w]
            probs = window_probs(rows, positions, keys[:, :, :n] if context_only else keys, n, scaling[layer])
            per_layer.append(layer_score(probs))
        return torch.stack(per_layer)
