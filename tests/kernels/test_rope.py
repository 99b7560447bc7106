"""The compiled rotary embedding against transformers' own, bit for bit, on the layouts attention modules pass."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

REFERENCE = getattr(apply_rotary_pos_emb, "draftapprox_original", apply_rotary_pos_emb)


def _inputs(b: int, heads: int, kv_heads: int, n: int, d: int, shared: bool = False):
    torch.manual_seed(n + d)
    # the projections' outputs viewed (b, n, heads, d) and transposed, as attention modules pass them
    q = torch.randn(b, n, heads, d, dtype=torch.bfloat16).transpose(1, 2)
    k = torch.randn(b, n, kv_heads, d, dtype=torch.bfloat16).transpose(1, 2)
    angles = torch.rand(1 if shared else b, n, d) * 1000
    return q, k, angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)


@pytest.mark.parametrize(("b", "heads", "kv_heads", "n", "d", "shared"), [
    (1, 14, 2, 300, 64, False),  # the draft's heads
    (2, 12, 2, 33, 128, False),  # the target's, a batch with positions of its own
    (3, 4, 4, 1, 32, True),  # a decode step, cos/sin shared by the batch
])
def test_it_gives_transformers_bits(b, heads, kv_heads, n, d, shared, kernel):
    q, k, cos, sin = _inputs(b, heads, kv_heads, n, d, shared)
    q_embed, k_embed = kernel.rope(q, k, cos, sin)
    q_ref, k_ref = REFERENCE(q, k, cos, sin)
    assert torch.equal(q_embed, q_ref) and torch.equal(k_embed, k_ref)
    assert q_embed.stride() == q.stride()  # the input's layout, which the attention after it reads


def test_it_refuses_what_it_does_not_compute(kernel):
    q, k, cos, sin = _inputs(1, 4, 2, 8, 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.rope(q.float(), k, cos, sin)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        kernel.rope(q[..., :48], k[..., :48], cos[..., :48], sin[..., :48])
    with pytest.raises(RuntimeError, match="cos and sin"):
        kernel.rope(q, k, cos[:, :4], sin[:, :4])
