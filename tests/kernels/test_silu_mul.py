"""The compiled SiLU-and-product against PyTorch's two in-place passes, on the roundings it promises to keep."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.mark.parametrize("shape", [(1, 4864), (37, 131), (256, 64)])  # a decode row, a tail past 16, whole blocks
def test_it_gives_pytorchs_bits(shape, kernel):
    torch.manual_seed(shape[1])
    gate, up = torch.randn(*shape, dtype=torch.bfloat16) * 4, torch.randn(*shape, dtype=torch.bfloat16)
    expected = F.silu(gate.clone()).mul_(up)
    ours = gate.clone()
    assert kernel.silu_mul_(ours, up) is not None
    assert torch.equal(ours, expected)  # in place, bit for bit


def test_large_and_special_values_as_pytorch_gives_them(kernel):
    gate = torch.tensor([-200.0, -88.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, float("inf"), float("-inf"),
                         float("nan")] * 3, dtype=torch.bfloat16)  # past one vector, so both paths see them
    up = torch.ones_like(gate)
    ours = gate.clone()
    kernel.silu_mul_(ours, up)
    torch.testing.assert_close(ours, F.silu(gate.clone()).mul_(up), equal_nan=True, atol=0, rtol=0)


def test_it_refuses_what_it_does_not_compute(kernel):
    with pytest.raises(RuntimeError, match="bfloat16"):
        kernel.silu_mul_(torch.randn(2, 16), torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="one shape"):
        kernel.silu_mul_(torch.randn(2, 16, dtype=torch.bfloat16), torch.randn(2, 32, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel.silu_mul_(torch.randn(16, 2, dtype=torch.bfloat16).t(), torch.randn(2, 16, dtype=torch.bfloat16))
