"""SpecKV as a press of NVIDIA kvpress: `pipe(context, question=q, press=SpecKVPress(draft, compression_ratio=0.75))`.

kvpress's presses score a layer's pairs from what that layer sees during the prefill. SpecKV also needs the
target's queries for the draft's answer, which exist only once the whole prompt has been prefilled, so the press
wraps the decoder's forward instead of hooking each layer: the prefill runs as the model's own, capturing the
prompt's tail queries; our `SpecKV` then writes the draft's answer, runs it through the target on top of that
cache and selects exactly as `draftapprox.generate` does; the cache kvpress handed in is pruned in place.

kvpress's semantics hold: `compression_ratio` keeps `int(n * (1 - ratio))` of the n compressed pairs in every KV
head (at least one), and the question comes after compression, so in its pipeline the draft looks ahead from the
context alone (put the question inside the context for query-aware compression, as kvpress's own evaluation
does). Our SpecKV drops the prompt's last pair and feeds that token again on the compressed cache; kvpress feeds
nothing again, so the press keeps that pair from the prefill instead: the kept pairs are SpecKV's selection for a
budget of `int(n * (1 - ratio)) - 1`, plus the last position.

kvpress's pipeline compresses before it feeds its chat template's question suffix and the answer prefix, so the
draft would look ahead from inside the user's turn, continuing it rather than answering. Given those ids as
`tail` (`pipeline_tail(pipe)`), the press runs our SpecKV on context + tail, as on the whole prompt: the draft
answers from the assistant's turn, and the context's pairs are kept (exactly kvpress's count of them).

`AdaSpecKVPress` allocates per head as our `AdaSpecKV` does. Heads then keep different numbers of pairs, which a
dense cache cannot hold, so, as kvpress's own `AdaKVPress` does, the dropped pairs stay in the cache and are masked
out of attention (kvpress's attention patch, `masked_key_indices`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import DynamicCache, DynamicLayer, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..cache import compress_cache, shallow_copy
from ..capture import PREFIX, QueryCapture, check_captured, decoder_layers, prepare, scope
from ..errors import ConfigError, InputError
from ..forward import forward
from ..methods import AdaSpecKV, SpecKV
from ..methods.scorer import ScorerKV
from ..prompt_state import PromptState

try:
    from kvpress import BasePress
    from kvpress.attention_patch import attention_patch
    from kvpress.utils import compute_n_kept
except ImportError as error:  # an optional extra: say how to get it rather than fail on a bare import
    raise ImportError("draftapprox.integrations.kvpress needs kvpress: pip install 'draftapprox[kvpress]'") from error


@dataclass
class SpecKVPress(BasePress):
    """SpecKV inside kvpress. `draft`: the draft model (same tokenizer as the target). `lookahead`: how many tokens
    the draft writes (the reference writes the request's `max_new_tokens`, which a press cannot see: set it to
    yours). `window`, `kernel`, `pool`, `reduction`: SpecKV's scoring knobs, with the paper's defaults.
    `tail`: the token ids fed after the compressed context before the answer (kvpress's pipeline feeds its chat
    template's question suffix and the answer prefix there: `pipeline_tail` gives them). Our SpecKV then runs on
    context + tail, as on the whole prompt it answers: the draft looks ahead from the assistant's turn, the tail's
    queries score, and the context's pairs are kept (the pipeline feeds the tail itself); a tail longer than the
    window widens the window to cover it."""

    draft: PreTrainedModel | None = None
    compression_ratio: float = 0.0
    lookahead: int = 64
    window: int = 32
    kernel: int = 7
    pool: str = "max"
    reduction: str = "max"
    tail: list[int] | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.compression_ratio < 1:
            raise ConfigError(f"compression_ratio must be in [0, 1), got {self.compression_ratio}")
        if self.draft is None:
            raise ConfigError(f"{type(self).__name__} needs a draft model: {type(self).__name__}(draft=..., "
                              "compression_ratio=...)")
        self.method(budget=self.window + 1)  # the knobs are checked now, not at the first prompt


    def method(self, budget: int, window: int | None = None) -> ScorerKV:
        """Our method that selects for a budget of `budget` pairs per head (`window`: a wider one than ours)."""
        method = SpecKV(budget=budget, window=window or self.window, kernel=self.kernel, pool=self.pool,
                        reduction=self.reduction, lookahead=self.lookahead)
        method.validate()
        return method

    @contextmanager
    def __call__(self, model: PreTrainedModel) -> Iterator[None]:
        """Compress the cache of the prefill run inside the block (kvpress's contract for a press)."""
        if self.draft is model or self.draft.get_decoder() is model.get_decoder():
            raise ConfigError(f"{type(self).__name__}: the draft must be another model than the target")
        decoder = model.get_decoder()
        inner, prior = decoder.forward, decoder.__dict__.get("forward")
        busy = []  # our own prefill is running: forwards inside it are the model's own

        def forward(*args, **kwargs):
            cache = kwargs.get("past_key_values")
            if busy or self.compression_ratio == 0 or (cache is not None and cache.get_seq_length() > 0):
                return inner(*args, **kwargs)  # a later forward (the question, decoding): the model's own
            if kwargs.get("use_cache") is False:
                raise InputError(f"{type(self).__name__} compresses the prefill's cache: use_cache=False keeps none")
            if cache is None:  # the caller keeps no cache: compress the one the output carries
                kwargs["past_key_values"] = cache = DynamicCache()
            busy.append(True)
            try:
                return self._prefill(model, inner, cache, args, kwargs)
            finally:
                busy.clear()

        decoder.forward = forward
        try:
            yield
        finally:  # the forward the decoder had before: its class's own, or a wrapper of someone else's
            if prior is None:
                del decoder.forward
            else:
                decoder.forward = prior

    def compress(self, *args, **kwargs):
        raise ConfigError(f"{type(self).__name__} selects once the whole prompt is prefilled, not layer by layer: "
                          "use it as the pipeline's press itself, not inside another press")

    forward_hook = compress

    def _prefill(self, model: PreTrainedModel, inner, cache: DynamicCache, args: tuple, kwargs: dict):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
            raise InputError(f"{type(self).__name__} needs input_ids: the draft reads token ids, not embeddings")
        if ids.shape[0] != 1:
            raise InputError(f"{type(self).__name__} compresses one context at a time, got a batch of "
                             f"{ids.shape[0]}")
        if type(cache) is not DynamicCache or any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise InputError(f"{type(self).__name__} prunes a plain DynamicCache, as kvpress's pipeline makes; "
                             f"got a {type(cache).__name__}")
        n = ids.shape[1]
        kept = compute_n_kept(n, self.compression_ratio)
        if kept >= n:
            return inner(*args, **kwargs)
        tail = torch.as_tensor(self.tail if self.tail is not None else [], dtype=ids.dtype).reshape(1, -1).to(ids)
        s = tail.shape[1]
        # the budget of our selection over context + tail: the window covers the tail's pairs but its last (fed
        # again); with no tail, the context's last pair is ours to keep on top (see the module's docstring)
        budget, window = kept + s - 1, max(self.window, s)  # the pipeline feeds the whole tail: none of it is cut
        if budget < window:
            raise ConfigError(f"compression_ratio={self.compression_ratio} keeps {kept} of this context's {n} pairs, "
                              f"fewer than the window needs ({window + 1 - s}): lower the ratio or the window")
        method = self.method(budget, window)
        capture = QueryCapture(rows=min(method.rows, n + s))
        with _routed(model):
            with scope(capture=capture):
                out = inner(*args, **kwargs)
            copy = shallow_copy(cache)
            if s:  # the tail on top of (a copy of) the context's cache, its queries after the context's
                forward(model, tail, copy, n, logits=False, capture=capture)
            check_captured(model, capture)
            state = PromptState(self.draft, model, torch.cat([ids, tail], dim=1), self.lookahead, _eos_ids(model),
                                cache=copy, queries=capture)
            keep = [mask[..., :n] for mask in method.select(state).keep]
        if not s:
            for mask in keep:
                mask[..., n - 1] = True
        self._prune(model, cache, keep)
        return out

    def _prune(self, model: PreTrainedModel, cache: DynamicCache, keep: list[torch.Tensor]) -> None:
        """Keep the selected pairs of every KV head, in position order (uniform: the same count in every head)."""
        for layer, kept in zip(cache.layers, compress_cache(cache, keep).layers, strict=True):
            layer.keys, layer.values = kept.keys, kept.values


@dataclass
class AdaSpecKVPress(SpecKVPress):
    """SpecKV's scores under AdaKV's per-head allocation. `alpha_safeguard`: the share of the uniform budget every
    head keeps at least (kvpress's and AdaKV's default, 0.2)."""

    alpha_safeguard: float = 0.2

    def method(self, budget: int, window: int | None = None) -> ScorerKV:
        method = AdaSpecKV(budget=budget, alpha=self.alpha_safeguard, scorer=super().method(budget, window))
        method.validate()
        return method

    def _prefill(self, model: PreTrainedModel, inner, cache: DynamicCache, args: tuple, kwargs: dict):
        if (model.config._attn_implementation or "eager").removeprefix(PREFIX) == "eager":
            raise ConfigError("AdaSpecKVPress masks pairs through kvpress's attention patch, which eager attention "
                              "bypasses: load the target with attn_implementation='sdpa'")
        return super()._prefill(model, inner, cache, args, kwargs)

    def _prune(self, model: PreTrainedModel, cache: DynamicCache, keep: list[torch.Tensor]) -> None:
        """Mask the dropped pairs out of attention, as kvpress's AdaKVPress does."""
        for layer, mask in zip(decoder_layers(model), keep, strict=True):
            batch, head, position = torch.nonzero(~mask, as_tuple=True)
            layer.self_attn.masked_key_indices = (batch, head, position)


@contextmanager
def _routed(model: PreTrainedModel) -> Iterator[None]:
    """The model's attention through our capture wrapper for the block, then back as the caller had it. The wrapper
    gets kvpress's attention patch too, so that heads masked by `AdaSpecKVPress` stay masked when the caller's
    model was routed through it already (one loaded by draftapprox)."""
    before = model.config._attn_implementation
    prepare(model)
    name = model.config._attn_implementation
    if not getattr(ALL_ATTENTION_FUNCTIONS[name], "_kvpress_patched", False):
        # kvpress patched the functions registered when it was imported; ours may be newer
        ALL_ATTENTION_FUNCTIONS[name] = attention_patch(ALL_ATTENTION_FUNCTIONS[name])
        ALL_ATTENTION_FUNCTIONS[name]._kvpress_patched = True
    try:
        yield
    finally:
        if not (before or "").startswith(PREFIX):
            model.set_attn_implementation(before)


def _eos_ids(model: PreTrainedModel) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    return frozenset([eos] if isinstance(eos, int) else eos or [])


def pipeline_tail(pipe, question: str = "", answer_prefix: str = "") -> list[int]:
    """The ids kvpress's pipeline `pipe` feeds after the compressed context for `question` (its chat template's
    question suffix, then `answer_prefix`), from its own `preprocess`: a press's `tail`."""
    options, _, _ = pipe._sanitize_parameters(question=question or None, answer_prefix=answer_prefix)
    return pipe.preprocess("", **options)["questions_ids"][0][0].tolist()
