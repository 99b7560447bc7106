"""Model forwards with explicit positions, optional capture, and only the logits that are needed.

Everything that runs a model goes through `forward`, so the rules hold everywhere: positions are explicit (a
compressed cache holds fewer entries than the position it continues from), logits are computed for the last
position only or not at all (the LM head over a 150k vocabulary is a large share of a small draft's prefill), and
capture/compressed-cache attention is switched on only for the forward that needs it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from .capture import QueryCapture, scope


@dataclass
class Timings:
    """Seconds per phase, accumulated; synchronises CUDA so GPU time lands in the right phase."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        sync = device is not None and device.type == "cuda"
        if sync:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if sync:
                torch.cuda.synchronize(device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


@torch.inference_mode()
def forward(model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache | None, start: int | torch.Tensor, *,
            logits: bool = True, capture: QueryCapture | None = None,
            compressed: bool = False) -> torch.Tensor | None:
    """Run `input_ids (b, q)` at positions `start .. start+q-1` (or at the given position ids `(b, q)`); returns
    last-position logits `(b, vocab)` or None.

    `compressed`: the cache is a compressed one (its length is not the position), see `capture.scope`.
    """
    input_ids = input_ids.to(model.device)
    q = input_ids.shape[1]
    if isinstance(start, torch.Tensor):
        positions = start.to(input_ids.device)
    else:
        positions = torch.arange(start, start + q, device=input_ids.device).expand(input_ids.shape[0], q)
    with scope(capture=capture, cache=cache if compressed else None, single_query_unmasked=compressed):
        if logits:
            out = model(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True,
                        logits_to_keep=1)
            return out.logits[:, -1, :]
        model.get_decoder()(input_ids=input_ids, position_ids=positions, past_key_values=cache, use_cache=True)
        return None

