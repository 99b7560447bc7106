"""What the upstream engine has probably cached, so that the proxy does not lose to the engine's prefix cache.

Engines keep the KV of the prompts they prefilled (vLLM's prefix caching, llama.cpp's `cache_prompt`), so a second
question about the same long document costs the engine alone only the question. A freshly cut prompt differs per
question and would miss that cache. The ledger remembers, as chained hashes of 16-token blocks (the way vLLM names
its cached blocks), the prompts forwarded whole and the cuts made, and the proxy then
  - forwards whole a prompt whose all but fewer than `min_prompt_tokens` tokens the engine holds ("cached");
  - keeps a cut stable: a prompt that shares at least `min_prompt_tokens` leading tokens with a prompt cut earlier
    (the same document, another question) gets that cut of the shared part and the rest of it whole ("shared").
    The engine finds the cut document in its cache and prefills only the question, and the draft does no work.
    The cut was chosen for the first question; `--no-prefix-reuse` cuts every prompt afresh instead.
The ledger is an estimate (the engine may evict sooner); a stale entry costs a prefill of what was forwarded.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

BLOCK = 16


def blocks(ids: list[int]) -> list[int]:
    """The chained hash of every whole leading block: equal hashes mean equal prefixes."""
    hashes, running = [], 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        running = hash((running, tuple(ids[start:start + BLOCK])))
        hashes.append(running)
    return hashes


class _Lru(OrderedDict):
    """Block hash -> value, the least recently used forgotten beyond `capacity` entries."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key: int, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)

    def longest(self, hashes: list[int]) -> int:
        """How many leading blocks are held (touching them, as a cache hit would)."""
        count = 0
        for h in hashes:
            if h not in self:
                break
            self.move_to_end(h)
            count += 1
        return count


@dataclass(frozen=True)
class Plan:
    """How to forward one prompt: whole (`reason` says why), cut afresh, or with an earlier cut of its prefix."""

    reason: str | None  # "cached", "shared", or None: cut it
    cached: int = 0  # leading tokens the engine probably holds (prompts forwarded whole)
    shared: int = 0  # leading tokens whose earlier cut is reused ("shared")
    positions: tuple[int, ...] = ()  # the earlier cut's kept positions below `shared`


class PrefixLedger:
    """The prompts forwarded whole and the cuts made, by leading blocks."""

    def __init__(self, capacity_tokens: int = 1 << 18) -> None:
        self._whole = _Lru(capacity_tokens // BLOCK)
        self._cuts = _Lru(capacity_tokens // BLOCK)  # block hash of a cut prompt's prefix -> its kept positions
        self._lock = threading.Lock()

    def plan(self, ids: list[int], min_prompt_tokens: int) -> Plan:
        hashes = blocks(ids)
        with self._lock:
            cached = self._whole.longest(hashes) * BLOCK
            if len(ids) - cached < min_prompt_tokens:
                return Plan("cached", cached)
            shared = self._cuts.longest(hashes)
            if shared * BLOCK >= min_prompt_tokens and len(ids) - shared * BLOCK < min_prompt_tokens:
                kept = self._cuts[hashes[shared - 1]]
                return Plan("shared", cached, shared * BLOCK, tuple(p for p in kept if p < shared * BLOCK))
        return Plan(None, cached)

    def forwarded_whole(self, ids: list[int]) -> None:
        with self._lock:
            for h in blocks(ids):
                self._whole.put(h, None)

    def cut(self, ids: list[int], positions: list[int]) -> None:
        """Remember the cut of `ids` under each of its leading blocks, for the prompts that share them."""
        kept = tuple(positions)
        with self._lock:
            for h in blocks(ids):
                self._cuts.put(h, kept)
