"""What the upstream engine has probably cached, so that the proxy does not lose to the engine's prefix cache.

Engines keep the KV of the prompts they prefilled (vLLM's prefix caching, llama.cpp's `cache_prompt`), so a second
question about the same long document costs the engine alone only the question. A cut prompt differs per question
and misses that cache. The ledger remembers, as chained hashes of 16-token blocks (the way vLLM names its cached
blocks), the prompts forwarded whole and those that were cut. The proxy then forwards a prompt whole when
  - the engine holds all but less than `min_prompt_tokens` of it (cutting cannot pay), or
  - it shares at least `min_prompt_tokens` leading tokens with an earlier prompt (the same document asked again):
    forwarding it whole puts the document in the engine's cache for the questions that follow.
The ledger is an estimate (the engine may evict sooner); a stale entry costs one whole prefill, what the engine
alone would have paid.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

BLOCK = 16


def _blocks(ids: list[int]) -> list[int]:
    """The chained hash of every whole leading block: equal hashes mean equal prefixes."""
    hashes, running = [], 0
    for start in range(0, len(ids) - BLOCK + 1, BLOCK):
        running = hash((running, tuple(ids[start:start + BLOCK])))
        hashes.append(running)
    return hashes


class _Blocks:
    """A bounded set of block hashes, least recently used evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self._hashes = capacity, OrderedDict()

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)

    def leading(self, hashes: list[int]) -> int:
        """How many leading blocks are held (touching them, as a cache hit would)."""
        count = 0
        for h in hashes:
            if h not in self._hashes:
                break
            self._hashes.move_to_end(h)
            count += 1
        return count


class PrefixLedger:
    """Prompts forwarded whole (probably in the engine's cache) and prompts seen at all, by leading blocks."""

    def __init__(self, capacity_tokens: int = 1 << 18) -> None:
        self._whole, self._seen = _Blocks(capacity_tokens // BLOCK), _Blocks(capacity_tokens // BLOCK)
        self._lock = threading.Lock()

    def decide(self, ids: list[int], min_prompt_tokens: int) -> tuple[str | None, int]:
        """Why to forward `ids` whole ("cached", "repeated") or None to cut it; and the tokens the engine likely
        holds. Records the prompt as seen."""
        hashes = _blocks(ids)
        with self._lock:
            cached = self._whole.leading(hashes) * BLOCK
            repeated = self._seen.leading(hashes) * BLOCK
            self._seen.add(hashes)
        if len(ids) - cached < min_prompt_tokens:
            return "cached", cached
        if repeated >= min_prompt_tokens:
            return "repeated", cached
        return None, cached

    def forwarded_whole(self, ids: list[int]) -> None:
        hashes = _blocks(ids)
        with self._lock:
            self._whole.add(hashes)
            self._seen.add(hashes)
