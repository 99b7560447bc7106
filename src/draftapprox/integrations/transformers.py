"""Any method of `draftapprox methods` inside a transformers model's own `generate`.

`patch(target, draft, method)` wraps the target's `generate` and `forward`. Inside a patched `generate`, the first
forward (the prompt) is ours: the prompt is prefilled and compressed exactly as `draftapprox.generate` does it
(the draft's lookahead included), the compressed cache is handed to `generate` in the cache it created, and the
first token's logits are returned. Every later forward is the model's own, over that cache, at the positions our
decoding uses (a compressed cache holds fewer entries than the position it continues from). So the stock
`GenerationMixin.generate` runs the decode loop, and with it sampling, logits processors, stopping criteria, stop
strings, streamers and `pipeline("text-generation")`.

What a compressed single-sequence cache cannot honour is refused by name rather than ignored: beam search, several
return sequences, an assistant model, `inputs_embeds`, a caller's cache, a batch of several prompts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from ..capture import scope
from ..errors import ConfigError, InputError
from ..generation import Record, prepare
from ..methods import Method, make
from ..models.loading import pair_from_models

_ATTRIBUTE = "_draftapprox_patch"


@dataclass
class _Call:
    """One patched `generate` call: its prompt's length, and after the prompt's forward, where decoding continues."""

    max_new_tokens: int
    n: int | None = None
    position: int = 0  # the position of the next token fed (not the cache's length: it is compressed)
    record: Record | None = None
    kept_ids: torch.Tensor | None = None  # a prompt method's kept prompt (None: all of it)
    inside: bool = False  # our own prefill is running: forwards go straight to the model


_call: ContextVar[_Call | None] = ContextVar("draftapprox_generate_call", default=None)


@dataclass
class Patch:
    """What `patch` installed on a model: the method and the pair it runs with, and what its last call did.
    (`unpatch` deletes the instance's wrappers, so the class's own methods show through again.)"""

    method: Method
    pair: object
    last_record: Record | None = None
    last_kept_ids: torch.Tensor | None = None


def patch(target: PreTrainedModel, draft: PreTrainedModel | None = None, method: Method | str = "speckv",
          tokenizer=None) -> PreTrainedModel:
    """Make `target.generate` apply `method` (an instance or a name of `draftapprox methods`) with `draft` as its
    draft model; returns `target`. Patching again replaces the method; `unpatch` restores the model."""
    method = make(method) if isinstance(method, str) else method
    if method.needs_draft and draft is None:
        raise ConfigError(f"{method.name} needs a draft model: patch(target, draft, method)")
    if getattr(target, _ATTRIBUTE, None) is not None:
        unpatch(target)
    pair = pair_from_models(target, tokenizer, draft)
    state = Patch(method, pair)
    original_generate, original_forward = target.generate, target.forward

    def generate(*args, **kwargs):
        inputs = _refuse(target, args, kwargs)
        config = kwargs.get("generation_config") or target.generation_config
        n = inputs.shape[1]
        max_new = kwargs.get("max_new_tokens") or getattr(config, "max_new_tokens", None)
        if max_new is None:
            max_new = max(1, (kwargs.get("max_length") or config.max_length or n + 20) - n)
        call = _Call(max_new)
        token = _call.set(call)
        try:
            out = original_generate(*args, **kwargs)
        finally:
            _call.reset(token)
        state.last_record, state.last_kept_ids = call.record, call.kept_ids
        if call.record is not None and not isinstance(out, torch.Tensor):
            out["draftapprox"] = call.record
        return out

    def forward(*args, **kwargs):
        call = _call.get()
        if call is None or call.inside:
            return original_forward(*args, **kwargs)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if call.n is None:  # the prompt: ours to prefill and compress
            return _prefill(state, call, input_ids, cache)
        b, q = input_ids.shape
        kwargs["position_ids"] = torch.arange(call.position, call.position + q, device=input_ids.device).expand(b, q)
        kwargs.pop("cache_position", None)  # generate's count of the uncompressed sequence: the cache's own is used
        call.position += q
        # the cache's tensors were made under inference mode; the logits leave it as ordinary tensors, which
        # generate's logits processors may change in place
        with torch.inference_mode(), scope(cache=cache, single_query_unmasked=True):
            out = original_forward(*args, **kwargs)
        out.logits = out.logits.clone()
        return out

    target.generate, target.forward = generate, forward
    setattr(target, _ATTRIBUTE, state)
    return target


def unpatch(target: PreTrainedModel) -> PreTrainedModel:
    """Restore the model's own `generate` and `forward`."""
    state = getattr(target, _ATTRIBUTE, None)
    if state is None:
        return target
    del target.generate, target.forward  # the instance attributes: the class's own methods show through again
    setattr(target, _ATTRIBUTE, None)
    return target


@contextlib.contextmanager
def patched(target: PreTrainedModel, draft: PreTrainedModel | None = None, method: Method | str = "speckv",
            tokenizer=None) -> Iterator[PreTrainedModel]:
    """`patch` for the block, `unpatch` after it."""
    patch(target, draft, method, tokenizer)
    try:
        yield target
    finally:
        unpatch(target)


def last_record(target: PreTrainedModel) -> Record | None:
    """The record of the patched model's last `generate` call (method, kept tokens, KV bytes, timings)."""
    state = getattr(target, _ATTRIBUTE, None)
    return state.last_record if state is not None else None


def last_kept_ids(target: PreTrainedModel) -> torch.Tensor | None:
    """The prompt a prompt method kept in the patched model's last `generate` call (None: all of it)."""
    state = getattr(target, _ATTRIBUTE, None)
    return state.last_kept_ids if state is not None else None


def _refuse(target: PreTrainedModel, args: tuple, kwargs: dict) -> torch.Tensor:
    """The prompt's ids, after refusing what a compressed single-sequence cache cannot honour."""
    config = kwargs.get("generation_config") or target.generation_config
    for name, bad, why in (("num_beams", lambda v: v > 1, "beam search"),
                           ("num_return_sequences", lambda v: v > 1, "several return sequences"),
                           ("assistant_model", lambda v: v is not None, "an assistant model"),
                           ("prompt_lookup_num_tokens", lambda v: v is not None, "prompt lookup decoding")):
        value = kwargs.get(name, getattr(config, name, None))
        if value is not None and bad(value):
            raise InputError(f"a patched generate does not support {why} ({name}={value!r}): the compressed cache "
                             "serves one sequence decoded greedily or by sampling")
    if kwargs.get("inputs_embeds") is not None:
        raise InputError("a patched generate takes input_ids, not inputs_embeds: the draft reads token ids")
    if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
        raise InputError("a patched generate builds its own compressed cache: do not pass past_key_values")
    inputs = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    if not isinstance(inputs, torch.Tensor) or inputs.ndim != 2:
        raise InputError("a patched generate needs input_ids of shape (1, n)")
    if inputs.shape[0] != 1:
        raise InputError(f"a patched generate runs one prompt at a time, got a batch of {inputs.shape[0]}: "
                         "compression chooses per prompt, so call it once per prompt")
    mask = kwargs.get("attention_mask")
    if mask is not None and not bool(mask.all()):
        raise InputError("a patched generate takes an unpadded prompt (its attention_mask must be all ones)")
    return inputs


def _prefill(state: Patch, call: _Call, input_ids: torch.Tensor, cache):
    """The prompt's forward: our prefill and compression into `generate`'s own cache; the first token's logits."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    call.inside = True
    try:
        prepared = prepare(state.pair, input_ids, state.method, max_new_tokens=call.max_new_tokens)
    finally:
        call.inside = False
    call.n, call.position, call.record = input_ids.shape[1], prepared.position, prepared.record
    call.kept_ids = prepared.kept_ids
    if cache is None:  # releases that let the model make the cache take it from the output
        cache = prepared.cache
    else:  # releases whose generate made the cache keep that object: it now holds the compressed layers
        cache.layers = prepared.cache.layers
        cache.layer_class_to_replicate = prepared.cache.layer_class_to_replicate
    return CausalLMOutputWithPast(logits=prepared.logits[:, None, :].clone(), past_key_values=cache)


