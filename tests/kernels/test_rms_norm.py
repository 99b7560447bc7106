"""The compiled RMSNorm against transformers' own, on the roundings it promises to keep."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm


def _norm(hidden: int, dtype: torch.dtype, seed: int = 0) -> Qwen2RMSNorm:
    torch.manual_seed(seed)
    norm = Qwen2RMSNorm(hidden, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(hidden, dtype=dtype)
    return norm


@pytest.mark.parametrize("hidden", [64, 1536, 1539])  # whole 16-column blocks, and a tail past them
@pytest.mark.parametrize("rows", [1, 37])
def test_bfloat16_rows_round_as_the_reference_does(hidden, rows, kernel):
    norm = _norm(hidden, torch.bfloat16, seed=rows)
    x = torch.randn(2, rows, hidden, dtype=torch.bfloat16) * 3
    ours, ref = kernel.rms_norm(x, norm.weight, 1e-6), norm(x)
    assert ours.shape == ref.shape and ours.dtype == torch.bfloat16
    # the sum of squares in another order moves an element at most one bfloat16 step, and only rarely
    assert (ours != ref).float().mean() < 1e-3
    torch.testing.assert_close(ours.float(), ref.float(), atol=0, rtol=2 ** -7)


def test_float32_rows_and_a_strided_input(kernel):
    norm = _norm(203, torch.float32)
    x = torch.randn(5, 406)[:, ::2]  # not contiguous
    torch.testing.assert_close(kernel.rms_norm(x, norm.weight, 1e-6), norm(x), atol=1e-5, rtol=1e-5)


def test_it_refuses_what_it_does_not_compute(kernel):
    with pytest.raises(RuntimeError, match="share a dtype"):
        kernel.rms_norm(torch.randn(2, 8), torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match="weight must be"):
        kernel.rms_norm(torch.randn(2, 8), torch.ones(9), 1e-6)
