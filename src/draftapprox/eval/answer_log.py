"""The append-only JSONL answer log shared by the grid and the peers' workers: one line per answer, written and
fsynced as soon as the answer exists, keyed so that a rerun skips what is done. A torn last line (a kill in the
middle of a write) is cut on opening, so a killed run loses at most the answer in flight.

Standard library only: the peers' workers run in their own virtual environments, without draftapprox installed,
and import this file by path.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path


def at_budget(name: str, budget: int | float | None) -> str:
    """`speckv@128`; FullKV and the draft, which have no budget, by their name alone."""
    return name if budget is None else f"{name}@{budget}"


def answer_key(sample_id: str, name: str, budget: int | float | None = None) -> str:
    """`vt/2048/42/0|speckv@128`: one method's answer on one prompt, the unit a rerun skips."""
    return f"{sample_id}|{at_budget(name, budget)}"


def label_of(key: str) -> str:
    """`speckv@128` from `vt/2048/42/0|speckv@128`: the method (knobs and budget included) that answered."""
    return key.split("|", 1)[1]


class Results:
    def __init__(self, path: str | Path, each: Callable[[dict], None] | None = None) -> None:
        """Open (or start) the log; `each` sees every row already in it, in this one read."""
        self.path = Path(path)
        self.done: set[str] = set()
        if self.path.exists():
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
            for row in read(self.path):
                self.done.add(row["key"])
                if each is not None:
                    each(row)
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(row["key"])


def read(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
