"""This machine's rates for the multiplies a forward is made of: a GEMM of a prefill's shape (FLOP/s) and a GEMV
streaming weights from memory (bytes/s). Model loading uses the first to decide bfloat16 against float32; the
benchmarks' limits (`bench.limits`) hold forwards to both."""

from __future__ import annotations

import torch

from .. import kernels
from ..kernels.probe import best
from . import compact

GEMV_WORKING_SET = 1 << 30  # bytes of weights a GEMV pass streams: far beyond any last-level cache


def gemm_rate(hidden: int, intermediate: int, dtype: torch.dtype, rows: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of `(rows x hidden) @ (hidden x intermediate)`, the largest multiply of a prefill chunk: the faster
    of the library's product and, in bfloat16, oneDNN's from a packed weight (what a packed model multiplies)."""
    a, w = torch.randn(rows, hidden, dtype=dtype), torch.randn(intermediate, hidden, dtype=dtype)
    products = [lambda: torch.nn.functional.linear(a, w)]
    if dtype == torch.bfloat16 and compact.packable():
        packed = torch.ops.mkldnn._reorder_linear_weight(w, compact.PACK_ROWS)
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], ""))
    return 2 * rows * hidden * intermediate / min(best(product, repeats) for product in products)


def gemv_rate(hidden: int, intermediate: int, dtype: torch.dtype) -> float:
    """Bytes/s of weights a single-row multiply streams from memory: matrices of the model's MLP shape (at least
    1024 x 4096, so a tiny model still measures the machine), cycled, so that none is cached. In bfloat16 the
    faster of the library's GEMV and the compiled kernel's: a limit below what the engine does would flatter
    it."""
    rows, cols = max(intermediate, 4096), max(hidden, 1024)
    size = rows * cols * torch.empty(0, dtype=dtype).element_size()
    weights = [torch.full((rows, cols), 0.01, dtype=dtype) for _ in range(max(2, GEMV_WORKING_SET // size))]
    x = torch.full((1, cols), 0.5, dtype=dtype)
    products = [lambda m: torch.nn.functional.linear(x, m)]
    if dtype == torch.bfloat16 and kernels.vectorised():
        rows32 = x.float()
        products.append(lambda m: kernels.load().linear_bf16(rows32, m))

    def sweep(product) -> None:
        for m in weights:
            product(m)

    return len(weights) * size / min(best(lambda product=product: sweep(product)) for product in products)
