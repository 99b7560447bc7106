"""Ada-SpecKV: SpecKV's draft-lookahead scores under AdaKV's per-head allocation (on the reference's roadmap,
never released there)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .adakv import AdaKV
from .scorer import ScorerKV
from .speckv import SpecKV


@dataclass
class AdaSpecKV(AdaKV):
    scorer: ScorerKV = field(default_factory=SpecKV)
    name = "adaspeckv"
    summary = "SpecKV scores with AdaKV's joint per-head allocation"
