"""Decode steps over fixed-shape storage, captured once as a CUDA graph on a GPU.

On a GPU a decode step is hundreds of small kernels launched one at a time from Python, and the GPU idles between
them (docs/results/gpu-h100/accuracy.md). gpt-fast's answer is a step whose every tensor keeps its shape and address
(a static cache), captured once as a CUDA graph and replayed: one launch per step, no Python per layer. Here the
cache becomes `StaticLayer`s (the prompt part padded as for any batch, the tail a buffer written at a step index
held in a tensor), the token and position inputs are tensors written in place, and the logits land in the same
output tensor every step. On a CPU, or where capture fails, the same static step runs eagerly: that is what the
tests exercise, and its tokens are those of the ordinary decode loop.
"""

from __future__ import annotations

import logging

import torch
from transformers import DynamicCache, PreTrainedModel

from .cache import BatchLayer, StaticLayer, batch_caches
from .forward import forward

log = logging.getLogger(__name__)

WARMUP_STEPS = 2
"""Eager steps before capture: the first calls allocate and pick kernels, which a graph must not record."""


class StaticDecode:
    """Decode steps for the sequences of `cache` (one, or a batch stacked by `batch_caches`), at most `steps` of
    them. `graph`: capture the step as a CUDA graph (None: whenever the model is on a GPU)."""

    def __init__(self, model: PreTrainedModel, cache: DynamicCache, steps: int, graph: bool | None = None):
        if steps < 1:
            raise ValueError(f"a static decode needs room for at least one step, got {steps}")
        self.model, self.capacity = model, steps
        device = model.device
        graph = device.type == "cuda" if graph is None else graph
        if graph and device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        if isinstance(cache.layers[0], StaticLayer):
            raise ValueError("this cache is another static decode's; pass its `written()` cache")
        layers = cache.layers if isinstance(cache.layers[0], BatchLayer) else batch_caches([cache]).layers
        self.step = torch.zeros(1, dtype=torch.long, device=device)
        self.cache = DynamicCache()
        self.cache.layers = [StaticLayer(layer, steps, self.step) for layer in layers]
        rows = layers[0].prefix_keys.shape[0]
        self._tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self._positions = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self._logits: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._capture = graph
        self.taken = 0

    @property
    def captured(self) -> bool:
        """Whether steps now replay a CUDA graph."""
        return self._graph is not None

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits `(rows, vocab)` after feeding `tokens (rows, 1)` at `positions (rows, 1)`. The returned tensor
        is a copy: the graph's own output is overwritten by the next step."""
        if self.taken >= self.capacity:
            raise ValueError(f"this static decode holds {self.capacity} steps; all are taken")
        self._tokens.copy_(tokens)
        self._positions.copy_(positions)
        if self._capture and self._graph is None and self.taken >= WARMUP_STEPS:
            self._record()
        if self._graph is not None:
            self._graph.replay()
        elif self._capture:
            stream = torch.cuda.Stream(self._tokens.device)  # warm-up off the default stream, as capture wants
            stream.wait_stream(torch.cuda.current_stream(self._tokens.device))
            with torch.cuda.stream(stream):
                self._logits = self._run()
            torch.cuda.current_stream(self._tokens.device).wait_stream(stream)
        else:
            self._logits = self._run()
        self.step.add_(1)
        self.taken += 1
        return self._logits.clone()

    def _run(self) -> torch.Tensor:
        return forward(self.model, self._tokens, self.cache, self._positions, compressed=True)

    def _record(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._logits = self._run()
        except RuntimeError as exc:  # an operation of this model that a graph cannot hold: stay eager
            log.warning("draftapprox: the decode step could not be captured as a CUDA graph (%s); decoding "
                        "without one", str(exc).splitlines()[0])
            self._capture = False
            return
        self._graph = graph

    def written(self) -> DynamicCache:
        """The cache so far (prompt parts and every token fed) as ordinary `BatchLayer`s, to go on decoding
        after the batch changes shape."""
        out = DynamicCache()
        out.layers = [layer.written() for layer in self.cache.layers]
        return out
