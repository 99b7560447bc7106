"""Model forwards with explicit positions, optional capture, and only the logits that are needed.

Everything that runs a model goes through `forward`, so the rules hold everywhere: positions are explicit (a
compressed cache holds fewer entries than the position it continues from), logits are computed for the last
position only or not at all (the LM head over a 150k vocabulary is a large share of a small draft's prefill), and
capture/compressed-cache attention is switched on only for the forward that needs it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from .capture import QueryCapture, StopForward, scope
from .models.compact import row_invariant


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


PREFILL_CHUNK = 2048
"""Longest piece a multi-token forward runs at once. Attention activations of a piece grow with piece x cache
length, so chunking keeps peak activation memory linear in the prompt length; 2048 costs nothing measurable at
the lengths where it does not bind (see docs/results/performance.md)."""


@dataclass
class _Interleave:
    chunk: Callable[[PreTrainedModel], int]
    between: Callable[[PreTrainedModel, int], None]


_interleave: ContextVar[_Interleave | None] = ContextVar("draftapprox_interleave", default=None)


@contextmanager
def interleaved(chunk: Callable[[PreTrainedModel], int],
                between: Callable[[PreTrainedModel, int], None]) -> Iterator[None]:
    """Run every forward inside the block in pieces of at most `chunk(model)` tokens (asked before each piece),
    calling `between(model, tokens)` after each piece with the tokens it ran. A server prefills one request this
    way while `between` decodes a step for the requests already running, so their streams keep flowing, and asks
    for small pieces only while some are running. `between` runs outside the block (its own forwards are neither
    chunked nor interleaved again) and may raise to abandon the forward."""
    token = _interleave.set(_Interleave(chunk, between))
    try:
        yield
    finally:
        _interleave.reset(token)


def _between(interleave: _Interleave | None, model: PreTrainedModel, tokens: int) -> None:
    if interleave is None:
        return
    token = _interleave.set(None)
    try:
        interleave.between(model, tokens)
    finally:
        _interleave.reset(token)


@functools.cache
def cache_keyword(module: type[torch.nn.Module]) -> str:
    """The keyword a model class's forward takes its cache by: transformers 5.24 renamed `past_key_values` to
    `cache` (the old name warns, and goes in 5.40), while earlier releases and models not yet migrated know only
    the old one."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


@torch.inference_mode()
def forward(model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache | None, start: int | torch.Tensor, *,
            logits: bool = True, capture: QueryCapture | None = None, compressed: bool = False,
            chunk: int | None = None, sparse: object | None = None, every: bool = False,
            rows_apart: bool = False) -> torch.Tensor | None:
    """Run `input_ids (b, q)` at positions `start .. start+q-1` (or at the given position ids `(b, q)`); returns
    last-position logits `(b, vocab)` or None.

    `every`: return the logits of every position, `(b, q, vocab)` (a verification pass over a drafted answer reads
    what the model would have written at each of its tokens); such a forward runs in one piece.
    `compressed`: the cache is a compressed one (its length is not the position), see `capture.scope`.
    `chunk`: longest piece run at once (default `PREFILL_CHUNK`); pieces extend the cache in order, so the result
    is the same as one forward up to float rounding.
    `sparse`: a `sparse.VerticalSlash` computing the attention; it needs every query of a layer at once (its
    columns are chosen from the sequence's tail), so such a forward is never chunked.
    `rows_apart`: every one of the `q` tokens is computed as a one-token step at its position would compute it, bit
    for bit (attention one query at a time, products row-invariant: `models.compact.row_invariant`), so that a
    speculative check takes exactly the tokens decoding one at a time would; such a forward runs in one piece.
    Without logits, a forward that captures a known set of layers stops after the last of them: nothing later is
    needed (its keys are cached and its queries recorded before the layer's attention runs).
    """
    input_ids = input_ids.to(model.device)
    b, q = input_ids.shape
    if isinstance(start, torch.Tensor):
        positions = start.to(input_ids.device)
    else:
        positions = torch.arange(start, start + q, device=input_ids.device).expand(b, q)
    interleave = _interleave.get()
    stop_after = max(capture.layers) if capture is not None and capture.layers and not (logits or every) else None
    out = None
    begin = 0
    while begin < q:
        step = q if sparse is not None or every or rows_apart else chunk or PREFILL_CHUNK
        if interleave is not None and sparse is None and not every:
            step = max(1, min(step, interleave.chunk(model)))
        ids, pos = input_ids[:, begin:begin + step], positions[:, begin:begin + step]
        begin += step
        last = begin >= q
        with scope(capture=capture, cache=cache if compressed else None, single_query_unmasked=compressed,
                   stop_after=stop_after, sparse=sparse, rows_apart=rows_apart), \
                row_invariant() if rows_apart else contextlib.nullcontext():
            try:
                if (logits or every) and last:
                    out = model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=0 if every else 1,
                                **{cache_keyword(type(model)): cache}).logits
                    out = out if every else out[:, -1, :]
                else:
                    decoder = model.get_decoder()
                    decoder(input_ids=ids, position_ids=pos, use_cache=True, **{cache_keyword(type(decoder)): cache})
            except StopForward:
                pass
        _between(interleave, model, ids.shape[1])
    return out
