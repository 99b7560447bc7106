"""Fixed-shape decode steps (what a CUDA graph replays): the tokens of the ordinary loop, storage that never moves."""

from __future__ import annotations

import pytest
import torch

import draftapprox as da
from draftapprox.cache import StaticLayer
from draftapprox.forward import forward
from draftapprox.static_decode import StaticDecode

from .conftest import prompt_ids


@pytest.mark.parametrize("method", [da.FullKV(), da.SnapKV(32, window=8), da.AdaKV(32)], ids=lambda m: m.name)
def test_static_steps_give_the_tokens_of_the_ordinary_loop(pair, method):
    """Contiguous and per-head caches; float32, as a GPU or CPU user runs it."""
    ids = prompt_ids(90)
    ordinary = da.generate(pair, ids, method, max_new_tokens=12, ignore_eos=True).tokens
    assert da.generate(pair, ids, method, max_new_tokens=12, ignore_eos=True, static=True).tokens == ordinary


def _prepared_cache(pair, n: int = 50):
    p = da.prepare(pair, prompt_ids(n), da.FullKV(), max_new_tokens=8)
    return p.cache, p.logits


def test_a_step_writes_in_place_and_never_reshapes(qwen_pair):
    """What makes a step capturable: the same tensors, shapes and addresses every step; only the step index
    (a tensor) and the written positions change."""
    cache, logits = _prepared_cache(qwen_pair)
    static = StaticDecode(qwen_pair.target, cache, steps=5)
    assert not static.captured  # no GPU: the same step, run eagerly
    layer = static.cache.layers[0]
    assert isinstance(layer, StaticLayer)
    before = (layer.keys.data_ptr(), layer.keys.shape, layer.prefix_keys.data_ptr(), layer.get_seq_length())
    token = logits.argmax(-1, keepdim=True)
    for i in range(3):
        logits = static(token, torch.tensor([[50 + i]]))
        token = logits.argmax(-1, keepdim=True)
        assert (layer.keys.data_ptr(), layer.keys.shape, layer.prefix_keys.data_ptr(),
                layer.get_seq_length()) == before
        assert int(static.step) == i + 1
        assert bool(layer.keys[:, :, i].abs().sum() > 0) and not bool(layer.keys[:, :, i + 1:].any())
    assert layer.written().keys.shape[2] == 3


def test_the_written_cache_continues_as_an_ordinary_one(qwen_pair):
    """A batch that changes membership takes the static step's cache back and goes on decoding it."""
    ids = prompt_ids(50)
    want = da.generate(qwen_pair, ids, da.FullKV(), max_new_tokens=6, ignore_eos=True).tokens
    cache, logits = _prepared_cache(qwen_pair)
    static = StaticDecode(qwen_pair.target, cache, steps=3)
    tokens = [int(logits.argmax())]
    for i in range(3):
        tokens.append(int(static(torch.tensor([[tokens[-1]]]), torch.tensor([[50 + i]])).argmax()))
    cache = static.written()
    for i in range(3, 5):
        out = forward(qwen_pair.target, torch.tensor([[tokens[-1]]]), cache, torch.tensor([[50 + i]]),
                         compressed=True)
        tokens.append(int(out.argmax()))
    assert tokens == want


def test_bad_uses_are_refused(qwen_pair):
    cache, logits = _prepared_cache(qwen_pair)
    with pytest.raises(ValueError, match="at least one step"):
        StaticDecode(qwen_pair.target, cache, steps=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA device"):
            StaticDecode(qwen_pair.target, cache, steps=2, graph=True)
    static = StaticDecode(qwen_pair.target, cache, steps=1)
    with pytest.raises(ValueError, match="another static decode"):
        StaticDecode(qwen_pair.target, static.cache, steps=1)
    token = logits.argmax(-1, keepdim=True)
    static(token, torch.tensor([[50]]))
    with pytest.raises(ValueError, match="all are taken"):
        static(token, torch.tensor([[51]]))
    with pytest.raises(ValueError, match="fixed number"):
        static.cache.layers[0].reserve(4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_captured_step_replays_the_tokens_of_the_eager_one(qwen_pair):
    pair = da.pair_from_models(qwen_pair.target.cuda(), qwen_pair.tokenizer)
    ids = prompt_ids(90)
    want = da.generate(pair, ids, da.FullKV(), max_new_tokens=12, ignore_eos=True).tokens
    cache, logits = _prepared_cache(pair, 90)
    static = StaticDecode(pair.target, cache, steps=11)
    tokens = [int(logits.argmax())]
    for i in range(11):
        tokens.append(int(static(torch.tensor([[tokens[-1]]], device="cuda"),
                                 torch.tensor([[90 + i]], device="cuda")).argmax()))
    assert static.captured and tokens == want
