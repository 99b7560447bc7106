"""Weights held in bfloat16, every product computed in float32 (`--dtype bfloat16-weights`).

On a CPU without bfloat16 instructions, neither plain precision is fast everywhere: float32 prefills at the GEMM
rate but a decode step must stream 4 bytes per weight, while bfloat16 halves those bytes but its emulated GEMMs
prefill several times slower than float32. Holding the weights in bfloat16 and widening them on the way gets both:
- a few rows (a decode step, a batched decode step, a lookahead): the compiled kernel multiplies float32 rows by
  the bfloat16 weights, widening them in registers, so a step reads half the bytes (`kernels/linear_bf16.cpp`);
- many rows (a prefill chunk): the weight is widened to float32 once for the chunk and multiplied by the GEMM
  library at its float32 rate; the widening is a few milliseconds against a chunk's hundreds.
Activations, the KV cache, attention and everything the capture sees are float32. The only rounding is that of
the parameters to bfloat16, which a bfloat16 model has too (`load_model` loads them in bfloat16, so the float32
model is never held whole).

A CPU with native bfloat16 (AVX-512 BF16, AMX) prefills a bfloat16 model at its GEMM rate, but PyTorch's bfloat16
GEMV for a decode step's single row streams the weights well below the memory bandwidth. `compact(model,
widen=False)` gives such a model the same kernel for its few-row products, the output head included, and leaves
everything else in bfloat16: its decode step reads the weights at the kernel's rate.

With `pack`, each layer also holds its weight laid out for oneDNN (`torch.ops.mkldnn._reorder_linear_weight`),
which otherwise reorders a plain weight on every call; multiplied in blocks of `PACK_ROWS` rows (`fuse.py`) it
runs a prefill's gated MLP faster, while for a few rows the kernel streams the plain weight faster than oneDNN
the packed one (docs/results/archive/profile-amx.md). So both copies are kept: the kernel reads the plain one for a few
rows, oneDNN the packed one for more. The cost is the memory of the decoder's linear weights a second time; the
output head, tied to the input embedding in the offline pair, is not packed (a prefill asks it for one row).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F

from .. import kernels
from . import scratch

log = logging.getLogger(__name__)

_row_invariant: ContextVar[bool] = ContextVar("draftapprox_row_invariant", default=False)


@contextmanager
def row_invariant() -> Iterator[None]:
    """Inside the block, a product of a few rows gives each row exactly what a product of that row alone gives (the
    kernel, never the packed GEMM, whose blocking depends on the number of rows): a speculative check of several
    tokens then computes each as a one-token decode step would, bit for bit."""
    token = _row_invariant.set(True)
    try:
        yield
    finally:
        _row_invariant.reset(token)

KERNEL_ROWS = 64
"""Most rows the kernel multiplies; beyond, widening the weight once and calling the GEMM is faster."""
PACKED_ROWS = 4
"""Most rows the kernel multiplies where a packed weight exists: past a few rows (a batched decode step) the packed
GEMM streams the weights faster than the kernel (docs/results/archive/profile-amx.md)."""
PACK_ROWS = 256
"""The rows a packed weight is laid out for, and the blocks a gated MLP runs a long chunk in (`fuse.py`): a
block's intermediate activations stay in cache between its three multiplies."""


def packable() -> bool:
    """Whether this torch can hold and multiply bfloat16 weights in oneDNN's layout here: its bfloat16 path needs
    AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT, and refuses to pack on a CPU without them."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight") \
        and (kernels.has("avx512_bw") or kernels.has("avx_ne_convert"))


class CompactLinear(torch.nn.Module):
    """`nn.Linear` with its weight stored in bfloat16: a few rows through the kernel (products in float32), many
    rows through the GEMM library in the activations' dtype, from the packed copy where there is one. The bias is
    kept in the activations' dtype."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # `.to` of a weight already in bfloat16 is the same storage: a tied output head stays tied
        self.weight = torch.nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach().to(dtype),
                                                                        requires_grad=False)
        self.packed: torch.Tensor | None = None  # not a parameter: derived from `weight`, never saved

    def pack(self) -> None:
        """Also hold the weight in oneDNN's layout, for products of more than `PACKED_ROWS` rows."""
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)

    def packed_for(self, x: torch.Tensor) -> bool:
        """Whether rows `x` multiply through the packed copy: bfloat16 CPU rows, more of them than the kernel is
        best at, and no gradient (oneDNN's packed product has none). The rows are counted by `x`'s own last
        dimension, so a gated MLP can ask its down projection about the rows it is about to run."""
        return self.packed is not None and x.is_cpu and x.dtype == torch.bfloat16 and not torch.is_grad_enabled() \
            and x.numel() // x.shape[-1] > PACKED_ROWS and not (_row_invariant.get() and x.numel() // x.shape[-1]
                                                                 <= KERNEL_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed_for(x):
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        rows = x.numel() // self.in_features
        few = rows <= KERNEL_ROWS and x.dtype in (torch.float32, torch.bfloat16) and x.is_cpu
        kernel = kernels.load() if few else None
        if kernel is None:
            return F.linear(x, widened(self.weight, x.dtype), self.bias)
        out = kernels.call("linear_bf16", x.reshape(rows, self.in_features), self.weight, self.bias)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed is not None else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, weights=bfloat16{packed}"


def widened(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` itself for bfloat16 activations; else `weight` in `dtype`, written into this thread's scratch
    buffer (`scratch.py`): a fresh tensor of a whole weight per linear per chunk costs more in page faults than
    the widening itself. The widened copy is used by one multiply and done with before the next linear widens its
    own."""
    if weight.dtype == dtype:
        return weight
    return scratch.buffer("widened", tuple(weight.shape), dtype).copy_(weight)


def compact(model: torch.nn.Module, *, widen: bool = True, pack: bool = False) -> torch.nn.Module:
    """Replace every `nn.Linear` of `model` by a `CompactLinear`, in place.

    `widen` (bfloat16-weights): widen every other parameter and buffer to float32, so activations and the KV cache
    are float32. A model loaded in bfloat16 so becomes the bfloat16 model's parameters computed in float32; a
    float32 one has only its linear weights rounded. The input embedding is a lookup, widened like the rest (a tied
    output head shares it and stays a float32 `Linear`).
    Without `widen`, the model must be bfloat16 and stays so; only its few-row products change, to the kernel's
    float32 sums of the same bfloat16 weights, the tied output head included (it is the same storage).
    `pack` (bfloat16 only): the linear layers but the output head also hold a packed copy (see above)."""
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("bfloat16-weights is a CPU precision; on a GPU use bfloat16")
    if not widen and next(model.parameters()).dtype != torch.bfloat16:
        raise ValueError("compact(widen=False) takes a bfloat16 model")
    if pack and (widen or not packable()):
        raise ValueError("compact(pack=True) takes a bfloat16 model, and a torch built with oneDNN")
    dtype = torch.float32 if widen else torch.bfloat16
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is torch.nn.Linear and (child.weight is not embedding or not widen):
                setattr(parent, name, CompactLinear(child, dtype))
                if pack and child is not head:
                    getattr(parent, name).pack()
    if widen:
        for module in model.modules():
            if isinstance(module, CompactLinear):
                continue
            for _, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.is_floating_point() and tensor.dtype != torch.float32:
                    tensor.data = tensor.data.float()
        if hasattr(model, "config"):
            model.config.dtype = torch.float32
    if kernels.load() is None:
        log.warning("draftapprox: bfloat16-weights without its kernel decodes at PyTorch's emulated speed")
    return model


def is_compact(model: torch.nn.Module) -> bool:
    return any(isinstance(m, CompactLinear) for m in model.modules())
