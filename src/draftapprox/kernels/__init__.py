"""Compiled CPU kernels, built once per machine, torch version and source text on first use (torch's C++ extension
loader, with ninja and the system's C++ compiler) and cached under the draftapprox cache directory.

They are optional: where the build fails (no compiler), `load` returns None, says why once, and callers keep
their portable PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import warnings
from pathlib import Path

import torch

from ..paths import cache_dir

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name)
           for name in ("module.cpp", "linear_bf16.cpp", "rms_norm.cpp", "decode_attention.cpp",
                      "prefill_attention.cpp", "silu_mul.cpp", "rope.cpp")]
HEADERS = [Path(__file__).with_name("simd.h")]  # included by the sources, so part of what a build is keyed by


@functools.cache
def load():
    """The compiled module (`linear_bf16`, `vectorised`, `rms_norm`, `decode_attention`, `prefill_attention`,
    `silu_mul_`, `rope`), or None where it cannot be built here."""
    from torch.utils import cpp_extension

    # one build per torch version and source text: processes running different checkouts never share a build
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS)).hexdigest()[:12]
    build = cache_dir() / "kernels" / f"torch-{torch.__version__}-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]  # OpenMP: at::parallel_for is serial without
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cpp_extension.load(name="draftapprox_kernels", sources=[str(s) for s in SOURCES],
                                      extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build),
                                      verbose=False)
    except (RuntimeError, OSError, ImportError, SystemExit) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        log.warning("draftapprox: the compiled CPU kernels could not be built (%s); using PyTorch", first)
        return None


def vectorised() -> bool:
    """Whether the kernels are built here with their AVX-512 paths; their portable loops are slower than PyTorch's
    bfloat16 GEMV and conversions, so bfloat16 callers use them only then."""
    module = load()
    return module is not None and module.vectorised()


def call(name: str, *args):
    """`load().<name>(*args)`, named `draftapprox::<name>` to torch.profiler, which does not see a pybind call on
    its own."""
    fn = getattr(load(), name)
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"draftapprox::{name}"):
            return fn(*args)
    return fn(*args)
