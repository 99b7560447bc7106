"""FullKV: keep every pair; the ceiling every method is compared with."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVMethod


@dataclass
class FullKV(KVMethod):
    """No compression: the target decodes from the uncompressed prefill cache (the ceiling).

    Knobs:
        `budget`: ignored (accepted so that every method takes one).
    """

    name = "fullkv"
    summary = "no compression: the uncompressed KV cache (ceiling)"

    def is_noop(self, n: int) -> bool:
        return True

    def budget_note(self, n: int) -> str | None:
        return None

    def describe(self) -> str:
        return "fullkv"  # its budget is ignored: showing one would suggest a cut
