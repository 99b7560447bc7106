"""What the engine chooses on this machine, and why: the kernel level, `auto`'s precision, and for each path
that has a compiled kernel and a PyTorch alternative, which one runs."""

from __future__ import annotations

import torch

from .. import attention, kernels
from ..kernels import probe
from . import loading
from .compact import KERNEL_ROWS, packable

# the offline pair's attention: (query heads, KV heads, head size) of the draft and of the target
PAIR_HEADS = {"draft": (14, 2, 64), "target": (12, 2, 128)}


def _features() -> str:
    shown = [("AVX-512 BF16", "avx512_bf16"), ("AMX", "amx_bf16"), ("AVX-512", "avx512_f"), ("AVX2", "avx2"),
             ("FMA", "fma3"), ("F16C", "f16c")]
    present = kernels.cpu_features()
    have = [name for name, flag in shown if flag in present]
    return ", ".join(have) if have else "none of AVX2/AVX-512 (portable kernels)"


def _auto() -> tuple[str, str]:
    choice = loading.auto_dtype("cpu")
    if choice == "bfloat16":
        return choice, f"native bfloat16 GEMMs ran {loading.bf16_gemm_speedup():.2f}x float32's rate here"
    if kernels.has("avx512_bf16") or kernels.has("amx_bf16"):
        why = f"bfloat16 GEMMs ran only {loading.bf16_gemm_speedup():.2f}x float32's rate here"
    else:
        why = "no native bfloat16 at this level"
    if choice == loading.COMPACT:
        return choice, f"{why}: weights in bfloat16 (half a decode step's bytes), products in float32"
    return choice, f"{why}, and no wide-vector kernel for bfloat16 weights (level {kernels.built()})"


def report() -> list[tuple[str, str, str]]:
    """(what, chosen, why) rows for the CPU, in the order a reader needs them. Measures what is not yet
    measured here (each probe once per machine and build, under a second)."""
    rows = [("CPU", probe.cpu_name(), _features())]
    want, built = kernels.requested(), kernels.built()
    if built is None:
        rows.append(("kernels", "none", "no level could be built here (see the warning above); PyTorch runs"))
    else:
        rows.append(("kernels", built, f"{kernels.ENV}={want}; build in {kernels.build_dir(built)}"))
    rows.append(("PyTorch's own loops", torch.backends.cpu.get_cpu_capability(),
                 f"{torch.get_num_threads()} threads (ATEN_CPU_CAPABILITY caps them)"))
    dtype, why = _auto()
    rows.append(("--dtype auto", dtype, why))
    wide = kernels.vectorised()
    few = f"compiled kernel up to {KERNEL_ROWS} rows, bfloat16 weights widened in registers" if built else \
        "weights widened once per call, then PyTorch's GEMM"
    rows.append(("few-row products (bfloat16 weights)", "kernel" if built else "pytorch", few))
    if dtype == "bfloat16":
        rows.append(("many-row products (bfloat16)", "oneDNN packed" if packable() else "PyTorch",
                     "weights held a second time in oneDNN's layout" if packable() else "plain weights"))
    rows.append(("decode attention", "kernel" if wide else "pytorch",
                 "one pass over the cache per KV head" if wide else "two matrix products per KV head"))
    compute = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    for role, (heads, kv_heads, d) in PAIR_HEADS.items():
        if not wide:
            rows.append((f"prefill attention ({role})", "pytorch", "no wide-vector kernel at this level"))
            continue
        pays = attention._prefill_kernel_pays(compute, heads, kv_heads, d)
        seconds = probe.verdicts(kernels.build_key())[attention.prefill_question(compute, heads, kv_heads, d)][
            "seconds"]
        rows.append((f"prefill attention ({role})", "kernel" if pays else "pytorch",
                     f"probed: kernel {seconds['kernel'] * 1e3:.1f} ms, PyTorch {seconds['pytorch'] * 1e3:.1f} ms "
                     f"at {attention.PROBE_TOKENS} tokens, {str(compute).removeprefix('torch.')}"))
    rows.append(("RMSNorm", "kernel" if built else "pytorch", "one pass instead of six operators" if built else ""))
    rows.append(("rotary, SiLU-and-product (bfloat16)", "kernel" if wide else "pytorch",
                 "one pass with PyTorch's roundings" if wide else "no wide-vector kernel at this level"))
    return rows
