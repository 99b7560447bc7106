"""The compiled decode attention's contract; its results against SDPA are in tests/test_attention.py, through
`single_query`, on every shape and dtype that reaches it."""

from __future__ import annotations

import pytest
import torch


def test_many_blocks_of_keys_merge_into_one_softmax(kernel):
    torch.manual_seed(3)
    key, value = torch.randn(1, 2, 2000, 64), torch.randn(1, 2, 2000, 64)
    key[:, :, 1500] *= 40  # one dominant key in a late block: the merge must weigh the blocks by their maxima
    query = torch.randn(1, 6, 64)
    ours = kernel.decode_attention(query, key, value, 0.125)
    scores = torch.einsum("bgrd,bgnd->bgrn", query.view(1, 2, 3, 64), key) * 0.125
    ref = torch.einsum("bgrn,bgnd->bgrd", scores.softmax(-1), value).reshape(1, 6, 64)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_it_refuses_what_it_does_not_compute(kernel):
    decode = kernel.decode_attention
    key = torch.randn(1, 2, 10, 64)
    with pytest.raises(RuntimeError, match="query must be float32"):
        decode(torch.randn(1, 4, 64, dtype=torch.bfloat16), key, key, 1.0)
    with pytest.raises(RuntimeError, match="does not fit"):
        decode(torch.randn(1, 3, 64), key, key, 1.0)  # 3 query heads over 2 KV heads
    with pytest.raises(RuntimeError, match="share a dtype"):
        decode(torch.randn(1, 4, 64), key, key.bfloat16(), 1.0)
    with pytest.raises(RuntimeError, match="contiguous"):
        decode(torch.randn(1, 4, 64), key.transpose(2, 3), key.transpose(2, 3), 1.0)
