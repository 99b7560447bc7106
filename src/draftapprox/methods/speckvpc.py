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
    """`budget`: KV pairs per head after SpecKV; `prompt_budget`: tokens kept by SpecPC (paper: 2048).

    The SpecPC stage uses `kernel=neighbors=pc_kernel` (paper: 32) and writes `lookahead` draft tokens
    (None: the request's max_new_tokens), whose attention it records and which SpecKV reuses.
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
