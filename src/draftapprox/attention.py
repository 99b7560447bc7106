"""Single-query attention for decoding: one compiled pass over the cache on a CPU, else matrix products on the KV
heads; and causal attention for a prefill chunk (the first or one that continues a cache): one compiled
flash-style pass on a CPU, else PyTorch's flash kernel.

A decode step's attention reads the cache once; CPU SDPA instead tiles the one query row per head into blocks made
for prefill and ran 7x below the memory bandwidth at 4k cached tokens (2.6 ms a layer of the 1.5B target, 74 ms
of a ~300 ms step). Grouping each KV head's query heads into the rows of one matrix product reads every key and
value once for all of them, with no `repeat_kv` copy, and the softmax runs in float32 as SDPA's does.
"""

from __future__ import annotations

import functools

import torch

from . import kernels


def single_query(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of `query (b, H, 1, d)` over every position of `key/value (b, G, n, d)` (H a multiple of G, a KV
    head's query heads consecutive, as `repeat_kv` orders them); returns `(b, 1, H, d)`, the layout the attention
    functions of transformers return. On a CPU with the compiled kernels, one pass over the cache
    (`kernels/decode_attention.cpp`); elsewhere two matrix products."""
    b, h, _, d = query.shape
    if _kernel_reads(query, key, value):
        out = kernels.call("decode_attention", query.reshape(b, h, d).float(), key, value, scaling)
        return out.to(query.dtype).view(b, 1, h, d)
    g = key.shape[1]
    rows = query.view(b, g, h // g, d)
    scores = torch.matmul(rows, key.transpose(-1, -2)).float() * scaling
    probs = scores.softmax(-1).to(value.dtype)
    return torch.matmul(probs, value).view(b, 1, h, d)


def _kernel_reads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether the compiled kernels compute this attention: CPU tensors in float32 or bfloat16, rows of the cache
    contiguous (a cache's views of its reserved buffers are), and the kernels' AVX-512 paths built."""
    if not (query.is_cpu and key.dtype == value.dtype and key.dtype in (torch.float32, torch.bfloat16)
            and key.stride(-1) == 1 and value.stride(-1) == 1 and key.shape[2] > 0 and not torch.is_grad_enabled()):
        return False
    return kernels.vectorised()


def causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of `query (b, H, q, d)`, the newest `q` positions of `key/value (b, G, n, d)`, each over every key
    up to its own position (a whole prompt, a prefill chunk after the first, a lookahead over a cached prompt);
    returns `(b, q, H, d)`. One compiled flash-style pass where `_prefill_kernel_reads`, else `causal_tail`."""
    if _prefill_kernel_reads(query, key, value):
        return kernels.call("prefill_attention", query, key, value, scaling)
    return causal_tail(query, key, value, scaling)


def _prefill_kernel_reads(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether `kernels/prefill_attention.cpp` computes this causal attention: what the decode kernel takes, with
    head sizes in whole 16-wide vectors. On the EPYC it ran the 0.5B and 1.5B's shapes at 1k-4k tokens in
    0.59-0.76x of CPU SDPA's time in float32 and 0.33-0.42x in bfloat16 (docs/results/prefill-attention.md). Not
    bfloat16 on a CPU with AMX: SDPA's tiles use the AMX units there (500-870 GFLOP/s on the AMX Xeon,
    docs/results/profile-amx.md) and the kernel's AVX-512 dot products were not measured against them."""
    return (_kernel_reads(query, key, value) and query.dtype == key.dtype and query.stride(-1) == 1
            and query.shape[-1] % 16 == 0 and not (query.dtype == torch.bfloat16 and _amx()))


@functools.cache
def _amx() -> bool:
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(caps.get("amx_bf16"))


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def causal_tail(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of `query (b, H, q, d)`, the newest `q` positions of `key/value (b, G, n, d)`, over every position
    before them and causally among themselves (a prefill chunk after the first, a lookahead over a cached prompt);
    returns `(b, q, H, d)`.

    Given that chunk, transformers builds a `(q, n)` mask and SDPA falls off its causal fast path: the second 2k
    chunk of a 4k prefill cost far more than the first. Here the earlier positions are one unmasked flash call, with
    a KV head's query heads folded into its rows (no `repeat_kv` copy of the cache), the newest block a causal one,
    and the two are merged by their log-sum-exps: the same softmax over the same keys, with no mask materialised.
    """
    b, h, q, d = query.shape
    g, n = key.shape[1], key.shape[2]
    r = h // g
    out_d, lse_d = _flash(query, key[:, :, n - q:].repeat_interleave(r, 1), value[:, :, n - q:].repeat_interleave(r, 1),
                          0.0, True, scale=scaling)
    if n == q:
        return out_d.transpose(1, 2)
    out_p, lse_p = _flash(query.reshape(b, g, r * q, d), key[:, :, :n - q], value[:, :, :n - q], 0.0, False,
                          scale=scaling)
    out_p, lse_p = out_p.reshape(b, h, q, d), lse_p.reshape(b, h, q)
    lse = torch.logaddexp(lse_p, lse_d)
    out = out_p.mul_((lse_p - lse).exp_().unsqueeze(-1)).add_(out_d.mul_((lse_d - lse).exp_().unsqueeze(-1)))
    return out.transpose(1, 2)
