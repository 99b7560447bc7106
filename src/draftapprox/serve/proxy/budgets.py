"""How much of a prompt the proxy keeps: a fixed budget (tokens or a ratio), or a keep curve by prompt length, by
default and per model.

A curve `4096:1.0,8192:0.5,32768:0.25` keeps the whole of a prompt up to 4,096 tokens, half at 8,192 and a quarter
from 32,768 on, the ratio interpolated linearly in between: short prompts, which the engine prefills cheaply and
the draft gains little on, pass whole, and the cut deepens as the prompt grows.
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass

from ...errors import ConfigError
from ...methods import Method, parse_budget


@dataclass(frozen=True)
class KeepCurve:
    points: tuple[tuple[int, float], ...]  # (prompt length, kept ratio), lengths increasing

    @classmethod
    def parse(cls, text: str) -> KeepCurve:
        points = []
        for item in text.split(","):
            length, colon, ratio = item.partition(":")
            try:
                point = (int(length), float(ratio))
            except ValueError:
                point = None
            if not colon or point is None or point[0] < 1 or not 0 < point[1] <= 1:
                raise ConfigError(f"a keep curve is LENGTH:RATIO,... with lengths >= 1 and ratios in (0, 1], as in "
                                  f"4096:1.0,8192:0.5; {item.strip()!r} in {text!r} is not one")
            points.append(point)
        lengths = [p[0] for p in points]
        if lengths != sorted(set(lengths)):
            raise ConfigError(f"a keep curve's lengths must increase, got {text!r}")
        return cls(tuple(points))

    def __call__(self, n: int) -> float:
        lengths = [p[0] for p in self.points]
        i = bisect.bisect_left(lengths, n)
        if i == 0:
            return self.points[0][1]
        if i == len(self.points):
            return self.points[-1][1]
        (a, fa), (b, fb) = self.points[i - 1], self.points[i]
        return fa + (fb - fa) * (n - a) / (b - a)

    def __str__(self) -> str:
        return ",".join(f"{length}:{ratio:g}" for length, ratio in self.points)


Budget = int | float | KeepCurve


def parse(text: str) -> Budget:
    """'256' tokens, '0.25' of the prompt, or a keep curve 'LENGTH:RATIO,...'."""
    return KeepCurve.parse(text) if ":" in text else parse_budget(text)


@dataclass(frozen=True)
class Budgets:
    """The proxy's budgets: `default` (None: the method's own), and per model the name a request sends."""

    default: Budget | None = None
    per_model: tuple[tuple[str, Budget], ...] = ()

    @classmethod
    def parse(cls, default: str | None, per_model: list[str] | None) -> Budgets:
        models = []
        for item in per_model or []:
            name, eq, value = item.partition("=")
            if not eq or not name.strip() or not value.strip():
                raise ConfigError(f"--model-budget takes MODEL=BUDGET (a count, a ratio or a keep curve), got {item!r}")
            models.append((name.strip(), parse(value.strip())))
        return cls(parse(default) if default is not None else None, tuple(models))

    def check(self, method: Method) -> None:
        """Refuse at start a budget `method` cannot run with (a count below its window), rather than per request."""
        for name, budget in (("--budget", self.default), *((f"--model-budget {m}", b) for m, b in self.per_model)):
            values = [] if budget is None else [r for _, r in budget.points] if isinstance(budget, KeepCurve) \
                else [budget]
            for value in values:
                try:
                    dataclasses.replace(method, budget=value)
                except ConfigError as error:
                    raise ConfigError(f"{name}: {error}") from None

    def for_prompt(self, model: str, n: int) -> int | float | None:
        """The budget for an `n`-token prompt sent to `model` (a curve read at n); None: the method's own."""
        budget = dict(self.per_model).get(model, self.default)
        return budget(n) if isinstance(budget, KeepCurve) else budget
