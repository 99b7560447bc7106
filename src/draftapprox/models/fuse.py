"""Gated MLPs whose activation and product run in place, and RMSNorms in one compiled pass.

A SwiGLU MLP (`down(silu(gate(x)) * up(x))`: Llama, Qwen2/3, Mistral) writes two fresh `(rows, intermediate)`
tensors per layer outside its matrix multiplies, and a fresh tensor's pages are faulted in on first touch. Applying
SiLU to the gate's output in place and multiplying the up projection into it saves both; one multiply over the gate
and up weights concatenated measured no faster and would duplicate them while loading, so they stay apart
(docs/results/archive/profile.md). On a CPU, a chunk of many rows also writes the gate and up projections into
per-thread buffers (`scratch.py`) instead of fresh tensors, which would be mapped and faulted in anew every layer.
Where the projections hold packed weights (`compact.py`), a long chunk runs the whole MLP in blocks of `PACK_ROWS`
rows instead, so a block's intermediate activations are still in cache when the next multiply reads them. The
arithmetic is the same products and sums. In bfloat16 on the CPU, SiLU and the product are one compiled pass with
PyTorch's two roundings (`kernels/silu_mul.cpp`), one read and one write instead of two of each.

The family's rotary embedding (`q * cos + rotate_half(q) * sin`, and the same for the keys) is five PyTorch
operators over a transposed view of the chunk's queries; in bfloat16 on the CPU it runs as one compiled pass with
the same roundings (`kernels/rope.cpp`), instead of five passes and their temporaries.

The Llama/Qwen/Mistral RMSNorm is six PyTorch operators over the activations; on the CPU it runs as one compiled
pass with the same roundings (`kernels/rms_norm.cpp`): one read of the activations instead of six passes, and
one call instead of six for each of a decode step's norms.
"""

from __future__ import annotations

import functools
import sys
import types

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

from .. import kernels
from . import scratch
from .compact import KERNEL_ROWS, PACK_ROWS, CompactLinear, widened

_GATED = {"gate_proj", "up_proj", "down_proj", "act_fn"}
_NORMS = {"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm"}  # transformers' one formula
_ROTARY = {"LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention"}  # one `apply_rotary_pos_emb`


def _plain(linear: torch.nn.Module) -> bool:
    """A plain or compact linear layer without hooks: one whose product may be written into a buffer, its call
    skipped."""
    return type(linear) in (torch.nn.Linear, CompactLinear) and not linear._forward_hooks \
        and not linear._forward_pre_hooks


def _into_buffer(linear: torch.nn.Module, x: torch.Tensor, role: str) -> torch.Tensor:
    """`linear(x)` for 2-D `x` and a `_plain` linear, written into this thread's buffer for `role`."""
    weight = widened(linear.weight, x.dtype) if type(linear) is CompactLinear else linear.weight
    out = scratch.buffer(role, (x.shape[0], linear.out_features), x.dtype)
    if linear.bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(linear.bias, x, weight.t(), out=out)


def _bf16_pass(*tensors: torch.Tensor) -> bool:
    """Whether a compiled bfloat16 pass may take these: bfloat16 CPU tensors, no gradient, the kernels built with
    wide vectors (AVX2 or AVX-512). What each pass needs of their shapes and layouts its caller checks."""
    return all(t.dtype == torch.bfloat16 and t.is_cpu for t in tensors) and not torch.is_grad_enabled() \
        and kernels.vectorised()


def _silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`, written into `gate`: one compiled pass for bfloat16 CPU activations (with PyTorch's
    roundings), else PyTorch's two in-place passes."""
    if _bf16_pass(gate, up) and gate.shape == up.shape and gate.is_contiguous() and up.is_contiguous():
        return kernels.call("silu_mul_", gate, up)
    return F.silu(gate, inplace=True).mul_(up)


def _gated(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(_silu_mul(self.gate_proj(x), self.up_proj(x)))


def _blocked(self, x: torch.Tensor) -> bool:
    """Whether `x` runs in row blocks: every projection packed, unhooked, and `x` taking their packed path."""
    projections = (self.gate_proj, self.up_proj, self.down_proj)
    return x.numel() // x.shape[-1] > PACK_ROWS and all(
        _plain(p) and type(p) is CompactLinear and p.packed_for(x) for p in projections)


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if _blocked(self, x):
        flat = x.reshape(rows, x.shape[-1])
        out = flat.new_empty(rows, self.down_proj.out_features)
        for begin in range(0, rows, PACK_ROWS):
            out[begin:begin + PACK_ROWS] = _gated(self, flat[begin:begin + PACK_ROWS])
        return out.view(*x.shape[:-1], -1)
    # out= products have no gradient; a hooked projection keeps its module call
    if rows > KERNEL_ROWS and x.is_cpu and not torch.is_grad_enabled() and _plain(self.gate_proj) \
            and _plain(self.up_proj):
        flat = x.reshape(rows, x.shape[-1])
        gate = _silu_mul(_into_buffer(self.gate_proj, flat, "mlp.gate"), _into_buffer(self.up_proj, flat, "mlp.up"))
        return self.down_proj(gate).view(*x.shape[:-1], -1)
    return _gated(self, x)


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.bfloat16:
        compiled = kernels.vectorised()  # the portable build's 4 lanes are no faster than PyTorch's own
    else:
        compiled = x.dtype == torch.float32 and kernels.load() is not None
    if compiled and x.is_cpu and not torch.is_grad_enabled() and x.dtype == self.weight.dtype:
        return kernels.call("rms_norm", x, self.weight, self.variance_epsilon)
    return type(self).forward(self, x)


def _rope_reads(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Whether `kernels/rope.cpp` rotates these: bfloat16 CPU queries and keys `(b, heads, n, d)` with contiguous
    rows, d a multiple of 32, and contiguous cos/sin `(b or 1, n, d)`, no gradient."""
    return (_bf16_pass(q, k, cos, sin) and q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape
            and cos.shape[0] in (1, q.shape[0]) and q.shape[0] == k.shape[0]
            and q.shape[2] == k.shape[2] == cos.shape[1] and q.shape[3] == k.shape[3] == cos.shape[2]
            and q.shape[3] % 32 == 0 and q.stride(-1) == 1 and k.stride(-1) == 1 and cos.is_contiguous()
            and sin.is_contiguous())


def _compiled_rope(original):
    """transformers' `apply_rotary_pos_emb` of the Llama family, one compiled pass where `_rope_reads`."""

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim == 1 and _rope_reads(q, k, cos, sin):
            q_embed, k_embed = kernels.call("rope", q, k, cos, sin)
            return q_embed, k_embed
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.draftapprox_original = original
    return apply_rotary_pos_emb


def _fuse_rope(modeling) -> None:
    """Route a modeling module's `apply_rotary_pos_emb` (which its attention calls by its global name) through the
    compiled pass: for every model of that architecture in the process, as the pass gives the same bits."""
    if not hasattr(modeling.apply_rotary_pos_emb, "draftapprox_original"):
        modeling.apply_rotary_pos_emb = _compiled_rope(modeling.apply_rotary_pos_emb)


def fusable(module: torch.nn.Module) -> bool:
    """A plain SwiGLU MLP: exactly the gate/up/down projections and SiLU."""
    children = dict(module.named_children())
    return set(children) == _GATED and isinstance(children["act_fn"], SiLUActivation | torch.nn.SiLU)


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Give every plain SwiGLU MLP of `model` the in-place forward, every RMSNorm of the Llama family the compiled
    one, and the family's rotary embedding its compiled pass; other modules are left as they are."""
    for module in model.modules():
        if fusable(module):
            module.forward = types.MethodType(_forward, module)
        elif type(module).__name__ in _NORMS:
            module.forward = types.MethodType(_norm_forward, module)
        elif type(module).__name__ in _ROTARY:
            _fuse_rope(sys.modules[type(module).__module__])
    return model
