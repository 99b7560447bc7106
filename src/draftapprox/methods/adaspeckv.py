"""Ada-SpecKV: SpecKV's draft-lookahead scores under AdaKV's per-head allocation (on the reference's roadmap,
never released there)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .adakv import AdaKV
from .scorer import ScorerKV
from .speckv import SpecKV


@dataclass
class AdaSpecKV(AdaKV):
    """SpecKV's scores under AdaKV's allocation: heads keep different numbers of the pairs the draft's answer needs.

    Knobs:
        `budget`: KV pairs kept per KV head, an int; or a float in (0, 1], that share of the prompt (never below
            `window`). A budget at or above the prompt keeps every pair. Default 256.
        `scorer`: the SpecKV whose scores are allocated (its window, kernel, pool, reduction and lookahead apply;
            its budget is ignored). Default `SpecKV()`.
        `alpha`: each head's floor, as a share of the uniform share; in [0, 1]. Default 0.2.
    """

    scorer: ScorerKV = field(default_factory=SpecKV)
    name = "adaspeckv"
    summary = "SpecKV scores with AdaKV's joint per-head allocation"
