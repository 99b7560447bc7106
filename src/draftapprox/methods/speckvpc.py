"""SpecKV-PC: SpecPC shortens the prompt, then SpecKV compresses the target's cache of what is left, reusing the
draft tokens SpecPC already wrote (no second draft run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Method
from .speckv import SpecKV
from .specpc import SpecPC


@dataclass
class SpecKVPC(Method):
    """SpecKV-PC: SpecPC cuts the prompt to `prompt_budget` tokens, then SpecKV keeps `budget` pairs per KV head of
    what is left, reusing the draft tokens SpecPC wrote.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256. (after SpecKV)
        `prompt_budget`: tokens SpecPC keeps (int, or a share of the prompt). Default 2048 (the paper's).
        `pc_window`: SpecPC's window. Default 64.
        `pc_kernel`: SpecPC's pooling width and neighbours (the paper: 32). Default 32.
        `pc_start_layer`: SpecPC's first draft layer. Default 8.
        `lookahead`: draft tokens written once and used by both stages; None: `max_new_tokens`. Default None.
        `window`: SpecKV's window. Default 32.
        `kernel`: SpecKV's pooling width; odd. Default 7.
    """

    prompt_budget: int | float = 2048
    pc_window: int = 64
    pc_kernel: int = 32
    pc_start_layer: int = 8
    lookahead: int | None = None
    window: int = 32
    kernel: int = 7
    name = "speckvpc"
    kind: ClassVar[str] = "cascade"
    summary = "cascade: SpecPC to prompt_budget tokens, then SpecKV to budget pairs, sharing the draft's tokens"
    needs_draft = True

    def validate(self) -> None:
        super().validate()
        self.stages(1)  # builds both stages once, so their own validation runs now

    def stages(self, max_new_tokens: int) -> tuple[SpecPC, SpecKV]:
        lookahead = max_new_tokens if self.lookahead is None else self.lookahead
        pc = SpecPC(budget=self.prompt_budget, window=self.pc_window, kernel=self.pc_kernel,
                    start_layer=self.pc_start_layer, lookahead=max(lookahead, 1))
        kv = SpecKV(budget=self.budget, window=self.window, kernel=self.kernel, lookahead=lookahead)
        return pc, kv
