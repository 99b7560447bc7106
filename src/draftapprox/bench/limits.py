"""The physical limits a forward is held to, measured on this machine in the same run as the methods.

A prefill is bound by matrix multiplies: its floor is the model's non-embedding multiply-adds at the rate this CPU
gives a GEMM of the model's own shapes. A decode step is bound by memory: it must read every weight but the input
embedding, plus the KV cache, at the rate a GEMV streams weights that do not fit in the caches. Both rates are
measured here (`models.rates`; the rows' `env` keeps them), so a ratio to a limit means the same thing on every
machine.
"""

from __future__ import annotations

import torch

from ..cache import kv_bytes_per_token
from ..errors import ConfigError
from ..models.rates import gemm_rate, gemv_rate


def matmul_params(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters a prefill multiplies: all but the input embedding and the LM head; parameters a decode step
    reads: those plus the LM head). The input embedding is a lookup and is never streamed."""
    if any(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in model.modules()):
        raise ConfigError("the GEMM-bound and bandwidth limits are of bfloat16/float32 models; this one has "
                          "dynamically quantised int8 linear layers")
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    total = sum(p.numel() for p in model.parameters() if p is not embedding and (head is None or p is not head.weight))
    return total, total + head_params


def streamed_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a decode step reads: every parameter but the input embedding, at its stored size
    (bfloat16-weights models hold their linear layers in 2 bytes). An output head tied to the embedding is read
    whole every step although its parameter is the embedding's, so it counts once."""
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    read = [p for p in model.parameters() if p is not embedding] + ([head.weight] if head is not None else [])
    # by storage: a head counts once, whether it is its own parameter, the embedding's, or its own on shared storage
    return sum({p.data_ptr(): p.numel() * p.element_size() for p in read}.values())


def bounds(model: torch.nn.Module, gemm: float, gemv: float, n: int) -> dict:
    """Seconds a prefill of `n` tokens cannot beat at `gemm` FLOP/s, and a decode step at `n` cached tokens at
    `gemv` bytes/s (the weights as stored, plus the KV cache in the activations' dtype)."""
    return {"prefill": 2 * matmul_params(model)[0] * n / gemm,
            "decode": (streamed_bytes(model) + n * kv_bytes_per_token(model)) / gemv}


def rates(model: torch.nn.Module) -> dict:
    """This machine's GEMM FLOP/s and GEMV bytes/s at the model's MLP shape and dtype."""
    cfg = model.config.get_text_config()
    dtype = next(model.parameters()).dtype
    return {"gemm_flops": gemm_rate(cfg.hidden_size, cfg.intermediate_size, dtype),
            "gemv_bytes": gemv_rate(cfg.hidden_size, cfg.intermediate_size, dtype)}
