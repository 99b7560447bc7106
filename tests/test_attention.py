import pytest
import torch
import torch.nn.functional as F

from draftapprox.attention import single_query


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "n"), [(12, 2, 300), (4, 4, 17), (14, 2, 1)])
def test_single_query_equals_sdpa_on_a_view_of_a_larger_buffer(dtype, heads, kv_heads, n):
    torch.manual_seed(0)
    buffer = torch.randn(2, kv_heads, n + 9, 64, dtype=dtype)
    key, value = buffer[:, :, :n], torch.randn(2, kv_heads, n + 9, 64, dtype=dtype)[:, :, :n]
    query = torch.randn(2, heads, 1, 64, dtype=dtype)
    ours = single_query(query, key, value, 0.125)
    ref = F.scaled_dot_product_attention(query, key, value, scale=0.125, enable_gqa=True).transpose(1, 2)
    assert ours.shape == (2, 1, heads, 64)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(ours, ref, **tol)
