import torch
from transformers import DynamicCache

from draftapprox.cache import HeadwiseLayer, compress_cache, kept_pairs, kv_bytes, shallow_copy
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
