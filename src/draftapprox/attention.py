"""Single-query attention for decoding: one compiled pass over the cache on a CPU, else matrix products on the KV
heads; and causal attention for a prefill chunk (the first or one that continues a cache): one compiled
flash-style pass on a CPU, else PyTorch's flash kernel.

A decode step's attention reads the cache once; CPU SDPA instead tiles the one query row per head into blocks made
for prefill and runs far below the memory bandwidth on long caches (docs/results/archive/profile.md). Grouping each
KV head's query heads into the rows of one matrix product reads every key and value once for all of them, with no
`repeat_kv` copy, and the softmax runs in float32 as SDPA's does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .kernels import probe


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
    contiguous (a cache's views of its reserved buffers are), and the kernels built with wide vectors."""
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
    head sizes in whole 16-wide vectors, where it beat PyTorch's path on this machine (`_prefill_kernel_pays`)."""
    return (_kernel_reads(query, key, value) and query.dtype == key.dtype and query.stride(-1) == 1
            and query.shape[-1] % 16 == 0 and _prefill_kernel_pays(query.dtype, query.shape[1], key.shape[1],
                                                                     query.shape[-1]))


PROBE_TOKENS = 1024
"""The prompt length the prefill attention is probed at."""


def prefill_question(dtype: torch.dtype, heads: int, kv_heads: int, d: int) -> str:
    """How the probe of `_prefill_kernel_pays` names its question (kernels/probe.py)."""
    return f"prefill attention, {str(dtype).removeprefix('torch.')}, {heads} heads on {kv_heads} of {d}, " \
           f"{PROBE_TOKENS} tokens"


def _prefill_kernel_pays(dtype: torch.dtype, heads: int, kv_heads: int, d: int) -> bool:
    """Whether the compiled prefill attention was faster than `causal_tail` here at these heads, over a prompt of
    `PROBE_TOKENS` (measured once per CPU and kernel build, kernels/probe.py). Where bfloat16 is native, SDPA's
    own tiles may use AMX, and at the AVX2 level the kernel's margin is narrower: a measurement decides."""
    def candidates() -> dict:
        g = torch.Generator().manual_seed(0)
        query = torch.randn(1, heads, PROBE_TOKENS, d, generator=g).to(dtype)
        key, value = (torch.randn(1, kv_heads, PROBE_TOKENS, d, generator=g).to(dtype) for _ in range(2))
        scale = d**-0.5
        return {"kernel": lambda: kernels.call("prefill_attention", query, key, value, scale),
                "pytorch": lambda: causal_tail(query, key, value, scale)}

    return probe.choose(kernels.build_key(), prefill_question(dtype, heads, kv_heads, d), candidates) == "kernel"


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
    if not query.is_cpu:
        return _causal_sdpa(query, key, value, scaling)
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


def _causal_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """`causal_tail` on devices other than the CPU (whose flash operator `_flash` is): SDPA with the queries' causal
    mask aligned to the newest keys, a KV head's query heads sharing its keys."""
    q, n = query.shape[2], key.shape[2]
    if q == n:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
    else:
        mask = torch.ones(q, n, dtype=torch.bool, device=query.device).tril(n - q)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, enable_gqa=True)
    return out.transpose(1, 2)
