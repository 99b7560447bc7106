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


ANSWER_FIELDS = ("key", "sample", "task", "length", "method", "budget", "score")  # every answer row has these


class NotOurs(ValueError):
    """A results file that is not one of ours (or not of the kind asked for): refused, and left untouched."""


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("key"), str) else None


class Results:
    def __init__(self, path: str | Path, each: Callable[[dict], None] | None = None,
                 kind: Callable[[dict], bool] | None = None, what: str = "results") -> None:
        """Open (or start) the log; `each` sees every row already in it, in this one read.

        A file that is not ours is refused untouched: every complete line must be one of our rows (and of the
        `kind` asked for). Only then is a torn last line (a write cut by a kill) cut off.
        """
        self.path = Path(path)
        self.done: set[str] = set()
        if self.path.is_dir():
            raise NotOurs(f"{self.path} is a folder, not a {what} file")
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        data = self.path.read_bytes()
        *complete, tail = data.split(b"\n")
        rows = []
        for number, line in enumerate(complete, 1):
            if line.strip():
                row = _row(line)
                if row is None or (kind is not None and not kind(row)):
                    raise NotOurs(f"{self.path} is not a {what} file of ours (line {number} is not one of its "
                                  "rows); it was left untouched: choose another output")
                rows.append(row)
        if tail.strip():
            row = _row(tail)
            if row is not None and (kind is None or kind(row)):
                rows.append(row)  # complete but unterminated: end it
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            elif rows:  # a torn write of ours
                with open(self.path, "r+b") as f:
                    f.truncate(len(data) - len(tail))
            else:
                raise NotOurs(f"{self.path} is not a {what} file of ours; it was left untouched: choose another "
                              "output")
        for row in rows:
            self.done.add(row["key"])
            if each is not None:
                each(row)

    def append(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(row["key"])


def read(path: str | Path, kind: Callable[[dict], bool] | None = None, what: str = "results") -> list[dict]:
    """Every row of a results file (of `kind`, if given); NotOurs names the first line that is not one. A torn last
    line (a run killed mid-write) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise NotOurs(f"{path} {'is a folder' if path.is_dir() else 'does not exist'}, not a {what} file")
    *complete, tail = path.read_bytes().split(b"\n")
    rows = []
    for number, line in enumerate(complete, 1):
        if line.strip():
            row = _row(line)
            if row is None or (kind is not None and not kind(row)):
                raise NotOurs(f"{path} is not a {what} file: line {number} is not one of its rows")
            rows.append(row)
    row = _row(tail) if tail.strip() else None
    if row is not None and (kind is None or kind(row)):
        rows.append(row)
    elif tail.strip() and not rows:
        raise NotOurs(f"{path} is not a {what} file")
    return rows
