"""The shared method interface: a budget (tokens or a keep ratio) plus each method's knobs as dataclass fields.

Three kinds, told apart by what they hand to generation:
- `KVMethod.select(state)` -> `KVSelection`: per-layer masks of prompt KV pairs to keep after the target's prefill.
- `PromptMethod.select(state)` -> kept prompt positions; the target (any engine) then sees only those tokens.
- the cascade SpecKV-PC, which chains one of each.
Masks and positions carry a batch axis and per-(sequence, head) counts, so batches of prompts of different lengths
need no new interface; `PromptState` holds one prompt's shared work (prefill, draft lookahead) so that several KV
methods can be evaluated on one prefill.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import DynamicCache

from ..errors import ConfigError
from ..prompt_state import PromptState


@dataclass
class Method:
    """Base of every method. `budget`: an int is a count of tokens, a float in (0, 1] a fraction of the prompt."""

    budget: int | float = 256

    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    needs_draft: ClassVar[bool] = False
    needs_target: ClassVar[bool] = False  # a prompt method that reads the target's attention (TargetPC)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, int | float):
            raise ConfigError(f"{self.name}: budget must be a token count or a ratio, not {b!r}")
        if isinstance(b, int) and b <= 0:
            raise ConfigError(f"{self.name}: budget must be > 0 tokens, got {b}")
        if isinstance(b, float) and not 0 < b <= 1:
            raise ConfigError(f"{self.name}: a budget ratio must be in (0, 1], got {b}")
        window = getattr(self, "window", None)
        if isinstance(b, int) and window is not None and window > b:
            raise ConfigError(f"{self.name}: window={window} is larger than the budget {b}")

    def tokens(self, n: int) -> int:
        """The budget in tokens for an `n`-token prompt. A ratio rounds down, as kvpress does, but never below the
        method's window: a ratio means "this share of whatever comes", and a short prompt must not turn it into a
        budget the method cannot run (an explicit token count below the window is refused by `validate`)."""
        if isinstance(self.budget, int):
            return self.budget
        return max(1, int(self.budget * n), getattr(self, "window", None) or 0)

    def budget_note(self, n: int) -> str | None:
        """What became of the budget on an `n`-token prompt when it is not the one asked for, so that a record
        tells a real cut from a pass-through; None when it was applied as asked."""
        if self.tokens(n) >= n:
            return f"the budget covers the {n}-token prompt: passed through uncut"
        asked = max(1, int(self.budget * n)) if isinstance(self.budget, float) else self.budget
        if asked < self.tokens(n):
            return (f"a ratio of {self.budget} gives {asked} tokens, fewer than window={self.window}: "
                    f"kept the window")
        return None

    def is_noop(self, n: int) -> bool:
        """A budget at or above the prompt length keeps everything (FullKV behaviour), it is not an error."""
        return self.tokens(n) >= n

    def check_window(self, budget: int) -> None:
        window = getattr(self, "window", None)
        if window is not None and window > budget:
            raise ConfigError(f"{self.name}: window={window} is larger than the budget of {budget} tokens")

    @property
    def rows(self) -> int:
        """Trailing prompt query rows this method reads from the target's shared prefill (0: none)."""
        return 0

    @classmethod
    def knobs(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name != "budget"]

    def describe(self) -> str:
        knobs = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.knobs())
        return f"{self.name}(budget={self.budget!r}{', ' + knobs if knobs else ''})"


@dataclass
class KVSelection:
    """Per layer, which of the n prompt positions each KV head keeps: `keep[layer]` is `(b, G, n)` bool.

    `refeed`: the last prompt token's pair is dropped and the token is fed again on the compressed cache (SpecKV);
    otherwise the first new token comes from the prefill's logits.
    `cache`: the cache `keep` indexes when the method ran its own prefill (sparse prefill); else the shared one.
    """

    keep: list[torch.Tensor]
    refeed: bool = False
    cache: DynamicCache | None = None


@dataclass
class KVMethod(Method):
    kind: ClassVar[str] = "kv"

    def prefills(self, n: int) -> bool:
        """Whether the method selects from the shared dense prefill (False: it runs its own, e.g. sparse)."""
        return True

    def select(self, state: PromptState) -> KVSelection:
        raise NotImplementedError


def odd_kernel(method: Method, kernel: int) -> None:
    if kernel < 1 or kernel % 2 == 0:
        raise ConfigError(f"{method.name}: kernel must be a positive odd number (same-length pooling), got {kernel}")


def choice(method: Method, knob: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise ConfigError(f"{method.name}: {knob} must be one of {', '.join(options)}, got {value!r}")


def positive(method: Method, knob: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{method.name}: {knob} must be an integer >= {minimum}, got {value!r}")


@dataclass
class PromptMethod(Method):
    """Keeps prompt tokens. `keep_positions`: feed kept tokens at their original position ids instead of 0..C-1."""

    keep_positions: bool = False
    kind: ClassVar[str] = "prompt"

    def select(self, state: PromptState) -> torch.Tensor:
        """Kept positions `(b, C)` in increasing order."""
        raise NotImplementedError

