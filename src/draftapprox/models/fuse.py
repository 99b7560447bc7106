"""Gated MLPs whose activation and product run in place.

A SwiGLU MLP (`down(silu(gate(x)) * up(x))`: Llama, Qwen2/3, Mistral) writes two fresh `(rows, intermediate)`
tensors per layer outside its matrix multiplies, 73 MB each in a 2k-token chunk of the 1.5B target, and a fresh
tensor's pages are faulted in on first touch. Applying SiLU to the gate's output in place and multiplying the up
projection into it took one such MLP from 648 to 584 ms (1.7 s of a 2k prefill); one multiply over the gate and up
weights concatenated measured no faster (597 ms) and would duplicate them while loading, so they stay apart. The
arithmetic is the same products and sums.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from transformers.activations import SiLUActivation

_GATED = {"gate_proj", "up_proj", "down_proj", "act_fn"}


def _forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(F.silu(self.gate_proj(x), inplace=True).mul_(self.up_proj(x)))


def fusable(module: torch.nn.Module) -> bool:
    """A plain SwiGLU MLP: exactly the gate/up/down projections and SiLU."""
    children = dict(module.named_children())
    return set(children) == _GATED and isinstance(children["act_fn"], SiLUActivation | torch.nn.SiLU)


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Give every plain SwiGLU MLP of `model` the in-place forward; other modules are left as they are."""
    for module in model.modules():
        if fusable(module):
            module.forward = types.MethodType(_forward, module)
    return model
