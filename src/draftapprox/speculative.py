"""Speculative decoding with the pair's draft: the draft proposes the next tokens from its own cache of the
prompt, and the target checks them all in one forward over its (compressed) cache.

Every draft-based method has already paid for a draft that read the whole prompt; here it also works while the
target decodes. The draft always proposes its greedy chain, whatever the sampling. A proposal that is certain is
a valid proposal distribution for the standard rejection rule (accept `d` with the target's probability of `d`,
else sample the target's distribution without `d`), so the target's distribution is kept exactly. And the chain is
what the draft's lookahead already wrote: the first proposals of a SpecKV, SpecPC or VeriSpecKV request cost no
draft forward at all.

`auto` chooses how many tokens to propose at each step from each sequence's running acceptance rate and the
measured seconds of a draft forward and of a target step of each width, and proposes none where that does not pay
(a prompt the draft gets wrong, a batch whose step is already cheap per token).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from .cache import kv_bytes, new_cache, rewind_cache, shallow_copy
from .errors import ConfigError
from .forward import forward
from .prompt_state import PromptState

AUTO = "auto"
MAX_AUTO = 8
"""The most tokens `auto` proposes at once; past this, even a draft that is always right gains little per step."""
PROBE_EVERY = 16
"""Steps `auto` goes without proposing before it proposes one token again, to see whether the draft now agrees."""
PRIOR_ACCEPTED, PRIOR_PROPOSED = 1.5, 2.0
"""The acceptance rate a sequence starts from (0.75), worth two proposals of evidence."""
DECAY = 0.8
"""Weight the acceptance counts keep at each step: the rate follows the draft's recent agreement."""
PAYS = 1.1
"""How much more `auto` must expect of proposing, in tokens per second, than of none: its cost model leaves out what
it cannot measure (a draft forward's Python, a batch's padding), so a promise within a tenth is not taken."""
WIDTH_PRIOR = 0.04
"""Until measured, each extra token a target step checks adds this share of a one-token step (decoding is bound by
reading the weights, which the extra tokens share)."""


def parse(value: int | str | None) -> int | str:
    """A speculative setting: a number of tokens to propose per step (0: off) or "auto"."""
    if value is None:
        return 0
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        if not text.isdigit():
            raise ConfigError(f"speculative must be a number of tokens (0: off) or 'auto', got {value!r}")
        value = int(text)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"speculative must be a number of tokens >= 0 (0: off) or 'auto', got {value!r}")
    return value


class Drafter:
    """The draft's side of one sequence: its cache (the prompt, then tokens it has fed since) and its greedy chain.

    `chain[:fed]` are in the cache after the prompt; `chain[fed]` is what the last cached position predicts. As
    long as what the target wrote agrees with the chain, the chain's next tokens are the proposals; where it
    differs, the cache goes back to the agreeing part and is fed what the target wrote instead.
    """

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, prompt_length: int, chain: list[int],
                 eos_ids: frozenset[int]):
        self.model, self.cache, self.n = model, cache, prompt_length
        self.chain, self.fed, self.eos_ids = chain, len(chain) - 1, eos_ids
        self.forwards, self.seconds = 0, 0.0  # the draft's forwards while decoding, and their wall time

    @classmethod
    def start(cls, state: PromptState) -> Drafter:
        """The drafter of a prompt: the draft's lookahead cache and tokens where a method left them (a copy, so a
        state shared with other methods keeps its own), else a draft prefill of the prompt."""
        draft = state.require_draft("speculative decoding")
        chain = state.draft_chain()
        if chain is not None:
            tokens, cache = chain
            return cls(draft, shallow_copy(cache), state.n, tokens, state.eos_ids)
        cache = new_cache()
        with state.timings.phase("draft", draft.device):
            logits = forward(draft, state.input_ids, cache, 0)
        return cls(draft, cache, state.n, [int(logits[0].argmax())], state.eos_ids)

    def copy(self) -> Drafter:
        """A drafter of its own over a copy of this one's cache: for another request identical to this one's."""
        return Drafter(self.model, copy.deepcopy(self.cache), self.n, list(self.chain), self.eos_ids)

    def free(self, written: list[int]) -> int:
        """Proposals after `written` the chain already holds (no draft forward needed)."""
        if self.chain[:len(written)] != written:
            return 0
        return len(self.chain) - len(written)

    def propose(self, written: list[int], k: int) -> list[int]:
        """The draft's next (up to) `k` greedy tokens after the prompt and `written`, the sequence's tokens so far;
        fewer where the chain reaches an end of sequence."""
        if k <= 0:
            return []
        began = time.perf_counter()
        common = 0
        limit = min(len(written), len(self.chain))
        while common < limit and written[common] == self.chain[common]:
            common += 1
        if common < len(written):
            keep = min(common, self.fed)
            rewind_cache(self.cache, self.fed - keep)
            ids = torch.tensor([written[keep:]], device=self.model.device)
            logits = forward(self.model, ids, self.cache, self.n + keep)
            self.chain, self.fed = [*written, int(logits[0].argmax())], len(written)
            self.forwards += 1
        while len(self.chain) - len(written) < k and self.chain[-1] not in self.eos_ids:
            ids = torch.tensor([[self.chain[self.fed]]], device=self.model.device)
            logits = forward(self.model, ids, self.cache, self.n + self.fed)
            self.fed += 1
            self.chain.append(int(logits[0].argmax()))
            self.forwards += 1
        self.seconds += time.perf_counter() - began
        return self.chain[len(written):len(written) + k]

    def kv_bytes(self) -> int:
        return kv_bytes(self.cache)


@dataclass
class Acceptance:
    """A sequence's running acceptance rate: the share of proposed tokens the target took, recent steps weighted
    most, starting from a prior."""

    accepted: float = 0.0
    proposed: float = 0.0

    def update(self, accepted: int, proposed: int) -> None:
        self.accepted = self.accepted * DECAY + accepted
        self.proposed = self.proposed * DECAY + proposed

    @property
    def rate(self) -> float:
        return (self.accepted + PRIOR_ACCEPTED) / (self.proposed + PRIOR_PROPOSED)


def expected_tokens(rate: float, k: int) -> float:
    """Tokens a step yields on average when `k` are proposed, each taken with probability `rate` while all before
    it were: the target's own token plus the accepted run."""
    return float(sum(rate**i for i in range(k + 1)))


@dataclass
class Costs:
    """Measured seconds of one batch's work: a draft forward, and a target step by (sequences, tokens each)."""

    draft_ratio: float  # a draft forward over a one-token target step, until both are measured (weights' bytes)
    draft: float | None = None
    steps: dict[tuple[int, int], float] = field(default_factory=dict)

    def saw_step(self, rows: int, width: int, seconds: float) -> None:
        old = self.steps.get((rows, width))
        self.steps[rows, width] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def saw_draft(self, forwards: int, seconds: float) -> None:
        if forwards:
            each = seconds / forwards
            self.draft = each if self.draft is None else 0.7 * self.draft + 0.3 * each

    def step(self, rows: int, width: int) -> float:
        """A target step's seconds: measured, else from this batch size's other widths, else from the nearest
        batch size measured (a step reads the weights once, and each token it feeds adds `WIDTH_PRIOR` of that);
        in units of a one-token step only while nothing at all is measured."""
        if (rows, width) in self.steps:
            return self.steps[rows, width]
        measured = sorted((w, s) for (r, w), s in self.steps.items() if r == rows)
        if not measured:
            if not self.steps:
                return 1 + WIDTH_PRIOR * (rows * width - 1)
            (r0, w0), s0 = min(self.steps.items(), key=lambda item: (abs(item[0][0] - rows), item[0][1]))
            return s0 / (1 + WIDTH_PRIOR * (r0 * w0 - 1)) * (1 + WIDTH_PRIOR * (rows * width - 1))
        w0, s0 = measured[0]
        base = s0 / (1 + WIDTH_PRIOR * rows * (w0 - 1))
        if len(measured) > 1 and measured[-1][0] > w0:
            w1, s1 = measured[-1]
            slope = max(0.0, (s1 - s0) / (w1 - w0))
            return s0 + slope * (width - w0) if width >= w0 else max(base, s0 - slope * (w0 - width))
        return base * (1 + WIDTH_PRIOR * rows * (width - 1))

    def draft_forward(self) -> float:
        """A draft forward's seconds (the draft drafts one sequence at a time, whatever the batch)."""
        return self.draft if self.draft is not None else self.draft_ratio * self.step(1, 1)


def choose_width(costs: Costs, rows: int, candidates: list[tuple[float, int, int, int | None]]) -> int:
    """How many tokens the `auto` sequences propose this step (0 to `MAX_AUTO`): the number with the most tokens
    per second over the whole step. `candidates` holds, per sequence, (acceptance rate, free proposals, most it may
    propose, its fixed proposal count or None for auto)."""
    best, best_rate, plain = 0, 0.0, None
    for k in range(MAX_AUTO + 1):
        tokens = drafting = 0.0
        width = 1
        for rate, free, most, fixed in candidates:
            own = min(fixed if fixed is not None else k, most)
            tokens += expected_tokens(rate, own)
            drafting += max(0, own - free) * costs.draft_forward()
            width = max(width, own + 1)
        per_second = tokens / (drafting + costs.step(rows, width))
        plain = per_second if plain is None else plain
        if per_second > best_rate * 1.0001 and (k == 0 or per_second >= plain * PAYS):
            best, best_rate = k, per_second
    return best
