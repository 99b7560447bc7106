"""RULER's scoring rules and the statistics the report needs.

`string_match_all` (fraction of expected strings found, case-insensitive) scores every task but QA;
`string_match_part` (any expected string found) scores QA. Predictions are cleaned as RULER does (strip, control
characters removed). Intervals are percentile bootstraps over samples, seeded, so a report is reproducible.
"""

from __future__ import annotations

import random
import re

from .ruler import TASKS

_CONTROL = re.compile(r"[\x00-\x1f]")


def clean(prediction: str) -> str:
    return _CONTROL.sub("\n", prediction.strip()).strip()


def string_match_all(prediction: str, expected: list[str]) -> float:
    text = clean(prediction).lower()
    return sum(e.lower() in text for e in expected) / len(expected)


def string_match_part(prediction: str, expected: list[str]) -> float:
    text = clean(prediction).lower()
    return float(any(e.lower() in text for e in expected))


def score(task: str, prediction: str, expected: list[str]) -> float:
    """The task's score of one answer, 0..100."""
    metric = string_match_part if TASKS[task].metric == "part" else string_match_all
    return 100.0 * metric(prediction, list(expected))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def bootstrap_mean_over_tasks(scores: dict[str, list[float]], rounds: int = 2000, seed: int = 0,
                              level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean over tasks of per-task means, with a percentile bootstrap interval that resamples each task's answers
    (a stratified bootstrap: the task mix stays fixed, as in the point estimate).

    A task with a single answer says nothing about its spread, and resampling it would give a zero-width interval
    that looks like certainty: the interval is then None (no interval), never a point."""
    point = mean([mean(v) for v in scores.values()])
    if any(len(v) < 2 for v in scores.values()):
        return point, None, None
    rng = random.Random(seed)
    stats = []
    for _ in range(rounds):
        stats.append(mean([mean(rng.choices(v, k=len(v))) for v in scores.values()]))
    stats.sort()
    lo = stats[int((1 - level) / 2 * rounds)]
    hi = stats[min(rounds - 1, int((1 + level) / 2 * rounds))]
    return point, lo, hi
