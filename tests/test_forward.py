"""`forward`: chunked prefill equals one forward; a capture-only forward stops after the last layer it needs; the
cache goes by the keyword the installed transformers takes."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import DynamicCache

from draftapprox.capture import QueryCapture, prepare
from draftapprox.forward import cache_keyword, forward

from .conftest import prompt_ids, tiny_model


@pytest.mark.parametrize("positions", ["offset", "tensor"])
def test_chunked_forward_equals_one_forward(arch, positions):
    model = prepare(tiny_model(arch, layers=3))
    ids = prompt_ids(50)
    start = 0 if positions == "offset" else torch.arange(0, 100, 2)[None]  # gaps, as kept positions have
    outs = []
    for chunk in (None, 16, 7):
        cache, capture = DynamicCache(), QueryCapture(rows=20)
        logits = forward(model, ids, cache, start, capture=capture, chunk=chunk)
        outs.append((logits, cache, capture))
    logits, cache, capture = outs[0]
    for other_logits, other_cache, other_capture in outs[1:]:
        torch.testing.assert_close(other_logits, logits, atol=1e-4, rtol=1e-4)
        for a, b in zip(cache.layers, other_cache.layers, strict=True):
            torch.testing.assert_close(b.keys, a.keys, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(b.values, a.values, atol=1e-4, rtol=1e-4)
        for layer, q in capture.queries.items():
            assert other_capture.queries[layer].shape == q.shape == (1, 4, 20, 16)
            torch.testing.assert_close(other_capture.queries[layer], q, atol=1e-4, rtol=1e-4)


def test_capture_only_forward_stops_after_the_last_captured_layer(qwen_pair):
    model, ids = qwen_pair.target, prompt_ids(40)
    full = DynamicCache()
    forward(model, ids, full, 0, logits=False)
    calls = []
    hook = model.model.layers[3].mlp.register_forward_hook(lambda *args: calls.append(1))
    try:
        for chunk in (None, 16):
            cache, capture = DynamicCache(), QueryCapture(rows=8, layers=frozenset({1, 2}))
            assert forward(model, ids, cache, 0, logits=False, capture=capture, chunk=chunk) is None
            assert sorted(capture.queries) == [1, 2]
            assert len(cache.layers) >= 3 and all(cache.layers[i].keys.shape[2] == 40 for i in range(3))
            for i in range(3):  # keys of every layer up to the last captured one are cached, and exact
                torch.testing.assert_close(cache.layers[i].keys, full.layers[i].keys)
        assert calls == []  # layer 3 never ran
        forward(model, ids, DynamicCache(), 0, capture=QueryCapture(rows=8, layers=frozenset({1})))
        assert calls == [1]  # with logits asked for, every layer runs
    finally:
        hook.remove()


def test_the_cache_goes_by_the_keyword_the_model_takes(arch):
    class Renamed(torch.nn.Module):  # transformers >= 5.24
        def forward(self, input_ids, cache=None): ...

    class Unmigrated(torch.nn.Module):  # earlier releases, and models not yet migrated
        def forward(self, input_ids, past_key_values=None): ...

    assert (cache_keyword(Renamed), cache_keyword(Unmigrated)) == ("cache", "past_key_values")
    model, cache = tiny_model(arch, layers=2), DynamicCache()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # what the deprecated name raises where it is renamed
        forward(model, prompt_ids(8), cache, 0)
        forward(model, prompt_ids(8), cache, 8, logits=False)
    assert cache.get_seq_length() == 16
