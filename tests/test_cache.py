import pytest
import torch
from transformers import DynamicCache

from draftapprox.cache import (
    BatchLayer,
    DenseLayer,
    HeadwiseLayer,
    batch_caches,
    compress_cache,
    head_size,
    kept_pairs,
    kv_bytes,
    kv_bytes_per_token,
    new_cache,
    reserve,
    shallow_copy,
    truncate_cache,
)
from draftapprox.forward import forward

from .conftest import prompt_ids, tiny_model


def _masked_dense_attention(query, keys, values, keep, scaling):
    """Reference: dense attention over all prompt keys with evicted ones masked out."""
    h, g = query.shape[1], keys.shape[1]
    k = keys.repeat_interleave(h // g, 1)
    v = values.repeat_interleave(h // g, 1)
    logits = (query @ k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~keep.repeat_interleave(h // g, 1)[:, :, None, :], float("-inf"))
    return (logits.softmax(-1) @ v).transpose(1, 2)


def test_headwise_layer_attention_equals_masked_dense():
    torch.manual_seed(0)
    keys, values = torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    keep = torch.rand(1, 2, 30) > 0.5
    layer = HeadwiseLayer(keys, values, keep)
    assert int(layer.head_lengths.sum()) == int(keep.sum())
    query = torch.randn(1, 4, 1, 8)
    empty = keys[..., :0, :]
    out, _ = layer.attend(query, empty, empty, 8**-0.5)
    torch.testing.assert_close(out, _masked_dense_attention(query, keys, values, keep, 8**-0.5))


def test_headwise_layer_with_tail_and_several_queries():
    torch.manual_seed(1)
    keys, values = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    keep = torch.rand(1, 2, 20) > 0.3
    layer = HeadwiseLayer(keys, values, keep)
    new_k, new_v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    tail_k, tail_v = layer.update(new_k, new_v)
    query = torch.randn(1, 4, 3, 8)
    out, _ = layer.attend(query, tail_k, tail_v, 0.3)
    all_k, all_v = torch.cat([keys, new_k], 2), torch.cat([values, new_v], 2)
    for i in range(3):  # query i sees the kept prefix and tail tokens 0..i
        mask = torch.cat([keep, torch.arange(3)[None, None, :].expand(1, 2, 3) <= i], -1)
        ref = _masked_dense_attention(query[:, :, i:i + 1], all_k, all_v, mask, 0.3)
        torch.testing.assert_close(out[:, i:i + 1], ref)


def test_compress_cache_dense_and_ragged_layers_and_bytes():
    model = tiny_model("qwen2")
    cache = DynamicCache()
    forward(model, prompt_ids(50), cache, 0)
    uniform = torch.zeros(1, 2, 50, dtype=torch.bool)
    uniform[..., ::5] = True
    ragged = uniform.clone()
    ragged[0, 0, 1:4] = True
    out = compress_cache(cache, [uniform, ragged, uniform, uniform])
    assert out.layers[0].keys.shape == (1, 2, 10, 16)
    assert torch.equal(out.layers[0].keys, cache.layers[0].keys[:, :, ::5])
    assert isinstance(out.layers[1], HeadwiseLayer)
    assert kept_pairs(out) == 3 * 20 + 23
    assert kv_bytes(out) == (3 * 20 + 23) * 16 * 4 * 2
    assert cache.layers[0].keys.shape[2] == 50  # the full cache is untouched


def test_shallow_copy_leaves_original_untouched():
    model = tiny_model("llama")
    cache = DynamicCache()
    forward(model, prompt_ids(12), cache, 0)
    copy = shallow_copy(cache)
    forward(model, prompt_ids(1, seed=5), copy, 12)
    assert cache.layers[0].keys.shape[2] == 12 and copy.layers[0].keys.shape[2] == 13


def _appended(cache, model, n, start, seed):
    forward(model, prompt_ids(n, seed=seed), cache, start)
    return cache.layers[0].keys.clone()


def test_appending_layers_equal_concatenation_and_write_in_place():
    model = tiny_model("qwen2")
    ours, theirs = new_cache(), DynamicCache()  # transformers' own layers concatenate
    for start, n in ((0, 20), (20, 1), (21, 3), (24, 1)):
        _appended(ours, model, n, start, start)
        _appended(theirs, model, n, start, start)
    assert isinstance(ours.layers[0], DenseLayer)
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    reserve(ours, 10)
    storage = ours.layers[0].keys.data_ptr()
    for i in range(10):  # within the reservation no step reallocates
        forward(model, prompt_ids(1, seed=i), ours, 25 + i, compressed=True)
        assert ours.layers[0].keys.data_ptr() == storage
    assert ours.layers[0].keys.shape[2] == 35


def test_caches_that_share_tensors_never_write_into_each_other():
    model = tiny_model("llama")
    cache = new_cache()
    forward(model, prompt_ids(12), cache, 0)
    copy = shallow_copy(cache)
    before = cache.layers[0].keys.clone()
    forward(model, prompt_ids(3, seed=5), copy, 12)  # the copy appends into storage of its own
    forward(model, prompt_ids(2, seed=6), cache, 12)  # the original appends in its own buffer
    assert torch.equal(copy.layers[0].keys[:, :, :12], before)
    assert copy.layers[0].keys.data_ptr() != cache.layers[0].keys.data_ptr()
    # A copy taken at a greater length survives the original's truncation and new appends.
    longer = shallow_copy(cache)
    seen = longer.layers[0].keys.clone()
    truncate_cache(cache, 12)
    forward(model, prompt_ids(2, seed=7), cache, 12)
    assert torch.equal(longer.layers[0].keys, seen)


def test_appending_keys_of_another_batch_is_refused():
    layer = DenseLayer()
    layer.update(torch.randn(2, 2, 4, 8), torch.randn(2, 2, 4, 8))
    with pytest.raises(ValueError, match="cannot append"):
        layer.update(torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8))


def test_batch_layer_tail_reserves_and_survives_selection():
    model = tiny_model("qwen2")
    caches = []
    for seed in (1, 2, 3):
        cache = new_cache()
        forward(model, prompt_ids(10 + seed, seed=seed), cache, 0)
        caches.append(cache)
    batch = batch_caches(caches)
    reserve(batch, 4)
    layer = batch.layers[0]
    assert isinstance(layer, BatchLayer)
    assert layer.capacity() == 4
    ids = torch.randint(0, 100, (3, 1))
    forward(model, ids, batch, torch.tensor([[11], [12], [13]]), compressed=True)
    assert layer.capacity() == 4 and layer.keys.shape[2] == 1  # appended into the reservation
    layer_tail = layer.keys[1:].clone()
    for each in batch.layers:
        each.select(torch.tensor([1, 2]))
    forward(model, ids[1:], batch, torch.tensor([[13], [14]]), compressed=True)
    assert torch.equal(layer.keys[:, :, :1], layer_tail) and layer.keys.shape == (2, 2, 2, 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tokens_kv_bytes_follow_the_configs_head_size_and_the_activations_dtype(dtype):
    model = tiny_model("qwen3", head_dim=32).to(dtype)  # a head size apart from hidden / heads (64 / 4)
    assert head_size(model.config) == 32
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 4 * 2 * 32 * torch.finfo(dtype).bits // 8  # keys and values, layers, KV heads
    cache = new_cache()
    forward(model, prompt_ids(37), cache, 0, logits=False)
    assert kv_bytes(cache) == 37 * per_token
