"""Vertical-slash sparse prefill: the block kernel equals a masked dense reference, and dense attention when the
pattern covers everything; SpecKV with it runs end to end and keeps what the dense prefill would keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from draftapprox.generation import generate, new_state, prefill
from draftapprox.methods import make
from draftapprox.sparse import vertical_slash_attention

from .conftest import prompt_ids


def _inputs(q=150, h=4, g=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, h, q, d, generator=gen), torch.randn(1, g, q, d, generator=gen),
            torch.randn(1, g, q, d, generator=gen))


def _reference(query, key, value, vertical, window, dense):
    """Dense attention under an explicit (q x q) mask per KV head, built row by row from the definition."""
    b, h, q, _ = query.shape
    g = key.shape[1]
    mask = torch.zeros(b, g, q, q, dtype=torch.bool)
    for head in range(g):
        columns = set(vertical[0, head].tolist())
        for i in range(q):
            for j in range(i + 1):
                mask[0, head, i, j] = i < dense or i - window <= j or j in columns
    mask = mask.repeat_interleave(h // g, dim=1)
    rep = lambda x: x.repeat_interleave(h // g, dim=1)  # noqa: E731
    return F.scaled_dot_product_attention(query, rep(key), rep(value), attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize(("window", "count", "block", "dense"), [(16, 10, 32, 0), (7, 25, 13, 40), (40, 3, 64, None)])
def test_blocks_equal_the_masked_reference(window, count, block, dense):
    query, key, value = _inputs()
    gen = torch.Generator().manual_seed(1)
    vertical = torch.stack([torch.randperm(150, generator=gen)[:count].sort().values for _ in range(2)])[None]
    out = vertical_slash_attention(query, key, value, vertical, window, 8**-0.5, block, dense)
    expected = _reference(query, key, value, vertical, window, count + window if dense is None else dense)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_pattern_that_covers_everything_is_dense_attention():
    query, key, value = _inputs()
    everything = torch.arange(150).expand(1, 2, -1)
    out = vertical_slash_attention(query, key, value, everything, 0, 8**-0.5, block=32, dense=0)
    dense = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_speckv_with_sparse_prefill(qwen_pair):
    ids = prompt_ids(300)
    knobs = {"window": 8, "kernel": 3, "lookahead": 6}
    dense = make("speckv", 64, **knobs)
    loose = make("speckv", 64, sparse_prefill=True, prefill_window=200, prefill_vertical=200, **knobs)
    sparse = make("speckv", 64, sparse_prefill=True, prefill_window=64, prefill_vertical=64, **knobs)
    assert loose.prefills(300) and not sparse.prefills(300) and sparse.prefills(128)
    state = new_state(qwen_pair, ids, 6)
    prefill(state, dense.rows)
    keep_dense = dense.select(state).keep
    state = new_state(qwen_pair, ids, 6)
    selection = sparse.select(state)
    assert state.cache is None and selection.cache is not None  # its own prefill, no shared dense one
    assert all(k.sum(-1).eq(64).all() for k in selection.keep)
    overlap = sum((a & b).sum() for a, b in zip(keep_dense, selection.keep, strict=True)) / sum(
        a.sum() for a in keep_dense)
    assert overlap > 0.5  # the approximate prefill still finds most of the same pairs
    result = generate(qwen_pair, ids, sparse, max_new_tokens=4)
    assert result.record.kv_bytes_kept * 300 == pytest.approx(result.record.kv_bytes_full * 64, rel=0.01)
    assert "target_prefill" in result.record.timings
    with pytest.raises(Exception, match="sparse_prefill is not available"):
        make("laq", 64, sparse_prefill=True)
