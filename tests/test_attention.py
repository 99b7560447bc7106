import pytest
import torch
import torch.nn.functional as F

from draftapprox import attention, kernels
from draftapprox.attention import causal_tail, single_query


@pytest.mark.parametrize("path", ["kernel", "matmul"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "n", "d"),
                         [(12, 2, 300, 64), (4, 4, 17, 64), (14, 2, 1, 64), (12, 2, 1000, 128), (6, 3, 40, 72)])
def test_single_query_equals_sdpa_on_a_view_of_a_larger_buffer(path, dtype, heads, kv_heads, n, d, monkeypatch):
    if path == "matmul":
        monkeypatch.setattr(attention, "_kernel_reads", lambda *tensors: False)
    elif not kernels.vectorised():
        pytest.skip("the compiled AVX-512 kernels are not built here")
    torch.manual_seed(0)
    buffer = torch.randn(2, kv_heads, n + 9, d, dtype=dtype)
    key, value = buffer[:, :, :n], torch.randn(2, kv_heads, n + 9, d, dtype=dtype)[:, :, :n]
    query = torch.randn(2, heads, 1, d, dtype=dtype)
    with torch.inference_mode():
        assert attention._kernel_reads(query, key, value) == (path == "kernel")
        ours = single_query(query, key, value, 0.125)
    ref = F.scaled_dot_product_attention(query.float(), key.float(), value.float(), scale=0.125,
                                         enable_gqa=True).transpose(1, 2)
    assert ours.shape == (2, 1, heads, d) and ours.dtype == dtype
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours.float(), ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "n", "q"), [(12, 2, 300, 100), (4, 4, 17, 17), (6, 2, 65, 2)])
def test_causal_tail_equals_masked_sdpa(dtype, heads, kv_heads, n, q):
    torch.manual_seed(1)
    key = torch.randn(1, kv_heads, n + 5, 32, dtype=dtype)[:, :, :n]  # a view of a cache buffer with room
    value = torch.randn(1, kv_heads, n + 5, 32, dtype=dtype)[:, :, :n]
    query = torch.randn(1, q, heads, 32, dtype=dtype).transpose(1, 2)  # the layout attention modules pass
    mask = torch.ones(q, n, dtype=torch.bool).tril(n - q)  # the newest q positions: all before, causal among them
    ref = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=0.2, enable_gqa=True)
    ours = causal_tail(query, key, value, 0.2)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(ours, ref.transpose(1, 2), **tol)


def test_chunked_forward_equals_one_piece(monkeypatch):
    """The chunks after the first take `causal_tail`; the logits and the cache match an unchunked forward."""
    from draftapprox import attention
    from draftapprox.cache import new_cache
    from draftapprox.capture import prepare
    from draftapprox.forward import forward

    from .conftest import prompt_ids, tiny_model

    calls = []
    monkeypatch.setattr(attention, "_flash", lambda *a, **k: calls.append(1) or torch.ops.aten.
                        _scaled_dot_product_flash_attention_for_cpu(*a, **k))
    model, ids = prepare(tiny_model("qwen2")), prompt_ids(70)
    whole, pieces = new_cache(), new_cache()
    ref = forward(model, ids, whole, 0)
    ours = forward(model, ids, pieces, 0, chunk=32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pieces.layers[-1].keys, whole.layers[-1].keys)
    assert len(calls) == 2 * 2 * len(model.model.layers)  # chunks 2 and 3, two flash calls a layer each
