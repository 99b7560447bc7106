"""The compiled prefill attention's contract; its results against SDPA on the shapes and dtypes that reach it are in
tests/test_attention.py, through `causal`."""

from __future__ import annotations

import pytest
import torch


def _reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    b, h, q, d = query.shape
    g, n = key.shape[1], key.shape[2]
    scores = query.float().view(b, g, h // g, q, d) @ key.float().unsqueeze(2).transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(q, n, dtype=torch.bool).tril(n - q).logical_not(), float("-inf"))
    return (scores.softmax(-1) @ value.float().unsqueeze(2)).view(b, h, q, d).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_late_dominant_key_rescales_what_came_before(dtype, kernel):
    """The online softmax: a key in a late block far above the earlier maxima must shrink their weights, for the
    rows that see it and not for the rows before it."""
    torch.manual_seed(3)
    key, value = torch.randn(1, 2, 700, 64, dtype=dtype), torch.randn(1, 2, 700, 64, dtype=dtype)
    key[:, :, 650] *= 30
    query = torch.randn(1, 14, 700, 64, dtype=dtype)
    ours = kernel.prefill_attention(query, key, value, 0.125)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 3e-2}
    torch.testing.assert_close(ours.float(), _reference(query, key, value, 0.125), **tol)


@pytest.mark.parametrize("threads", [1, 2])
def test_the_result_does_not_depend_on_the_threads(threads, kernel):
    """Tasks are taken by whichever thread is free; each row's sums are one task's, so the order is fixed."""
    torch.manual_seed(4)
    key, value = torch.randn(1, 2, 333, 128), torch.randn(1, 2, 333, 128)
    query = torch.randn(1, 12, 333, 128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernel.prefill_attention(query, key, value, 0.1)
        torch.set_num_threads(threads)
        torch.testing.assert_close(kernel.prefill_attention(query, key, value, 0.1), one, atol=0, rtol=0)
    finally:
        torch.set_num_threads(before)


def test_it_refuses_what_it_does_not_compute(kernel):
    attend = kernel.prefill_attention
    key = torch.randn(1, 2, 10, 64)
    with pytest.raises(RuntimeError, match="share a dtype"):
        attend(torch.randn(1, 4, 10, 64, dtype=torch.bfloat16), key, key, 1.0)
    with pytest.raises(RuntimeError, match="does not fit"):
        attend(torch.randn(1, 3, 10, 64), key, key, 1.0)  # 3 query heads over 2 KV heads
    with pytest.raises(RuntimeError, match="does not fit"):
        attend(torch.randn(1, 4, 11, 64), key, key, 1.0)  # more queries than keys
    with pytest.raises(RuntimeError, match="does not fit"):
        attend(torch.randn(1, 4, 10, 24), torch.randn(1, 2, 10, 24), torch.randn(1, 2, 10, 24), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        attend(torch.randn(1, 4, 64, 10).transpose(2, 3), key, key, 1.0)
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        attend(torch.randn(1, 4, 10, 64, dtype=torch.float16), key.half(), key.half(), 1.0)
