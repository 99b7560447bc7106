"""Compiled CPU kernels, built once per instruction-set level, torch version, compiler flags and source text on
first use (torch's C++ extension loader, with ninja and the system's C++ compiler), and cached under the
draftapprox cache directory.

Every kernel is written once against `simd.h`, which each level fills in: `avx512bf16` (AVX-512 with its bfloat16
dot products), `avx512`, `avx2` (with FMA and F16C), and `portable` (C++ vector extensions: SSE2 on any x86-64,
NEON on ARM). `DRAFTAPPROX_KERNEL_ISA` chooses one (`native`, the default, is the best this CPU runs), so that any
x86 machine can build and test the levels below its own; a level this CPU cannot run, or one that fails to build,
is reported once and the next level down is used. A build is keyed by its level and flags, so a cache shared
between machines never hands a CPU code it cannot execute.

They are optional: where no level builds (no compiler), `load` returns None, says why once, and callers keep
their PyTorch path.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from ..paths import cache_dir

log = logging.getLogger(__name__)
SOURCES = [Path(__file__).with_name(name)
           for name in ("module.cpp", "linear_bf16.cpp", "rms_norm.cpp", "decode_attention.cpp",
                      "prefill_attention.cpp", "silu_mul.cpp", "rope.cpp")]
HEADERS = [Path(__file__).with_name("simd.h")]  # included by the sources, so part of what a build is keyed by

ENV = "DRAFTAPPROX_KERNEL_ISA"
LEVELS = ("avx512bf16", "avx512", "avx2", "portable")
"""What a build is compiled for, best first."""
REQUESTS = ("native", *LEVELS)
_NEEDS = {  # CPU features (torch.cpu.get_capabilities' names) a level's -march may use (MOVBE, which
    # x86-64-v3 also allows, is not in that list; every CPU with the others has it)
    "avx512bf16": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_cd", "avx512_bf16", "avx2", "fma3",
                   "f16c", "bmi", "bmi2", "lzcnt"),
    "avx512": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx512_cd", "avx2", "fma3", "f16c", "bmi", "bmi2",
               "lzcnt"),
    "avx2": ("avx2", "fma3", "f16c", "bmi", "bmi2", "lzcnt"),
    "portable": (),
}
_FLAGS = {"avx512bf16": ["-march=x86-64-v4", "-mavx512bf16"], "avx512": ["-march=x86-64-v4"],
          "avx2": ["-march=x86-64-v3"], "portable": []}
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
LIBOMP = (Path("/opt/homebrew/opt/libomp"), Path("/usr/local/opt/libomp"))
"""Where Homebrew puts libomp (Apple Silicon, Intel Macs): Apple's clang has OpenMP only through it."""


@functools.cache
def cpu_features() -> frozenset[str]:
    """The instruction-set features this CPU reports (PyTorch's cpuinfo names), whatever the level in use."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return frozenset(name for name, present in caps.items() if present is True)


def executable() -> tuple[str, ...]:
    """The levels this CPU can run, best first (only `portable` off x86)."""
    if not _X86:
        return ("portable",)
    return tuple(level for level in LEVELS if set(_NEEDS[level]) <= cpu_features())


def requested() -> str:
    """`DRAFTAPPROX_KERNEL_ISA`, lower-cased; `native` when unset or not one of `REQUESTS` (said once)."""
    value = os.environ.get(ENV, "").strip().lower() or "native"
    if value not in REQUESTS:
        _once(f"{ENV}={value!r} is not one of {', '.join(REQUESTS)}; using native")
        return "native"
    return value


def level() -> str:
    """The level in use: the requested one, or the best below it that this CPU runs (said once)."""
    want, runs = requested(), executable()
    if want == "native":
        return runs[0]
    if want in runs:
        return want
    below = [lvl for lvl in runs if LEVELS.index(lvl) > LEVELS.index(want)]
    _once(f"{ENV}={want}: this CPU cannot run it; using {below[0]}")
    return below[0]


def has(feature: str) -> bool:
    """Whether the engine may rely on a CPU feature: this CPU has it and the level in use (the one built, else the
    one requested) does not rule it out. Below `avx512bf16` that rules out native bfloat16 (AVX-512 BF16 and AMX),
    below `avx512` all of AVX-512, so that `DRAFTAPPROX_KERNEL_ISA=avx2` makes the engine's choices an AVX2 CPU
    would."""
    if feature not in cpu_features():
        return False
    rank = LEVELS.index(built() or level())
    if feature.startswith("amx") or feature == "avx512_bf16":
        return rank <= LEVELS.index("avx512bf16")
    if feature.startswith("avx512"):
        return rank <= LEVELS.index("avx512")
    if rank == LEVELS.index("portable"):
        return not feature.startswith(("avx", "fma", "f16c"))
    return True


@functools.cache
def _once(message: str) -> None:
    log.warning("draftapprox: %s", message)


def _openmp() -> tuple[list[str], list[str]]:
    """Compiler and linker flags for OpenMP (without it `at::parallel_for` in the kernels runs on one thread).
    Apple's clang has no `-fopenmp`: there Homebrew's `omp.h` is used where installed, else none, and the kernels
    link the libomp torch ships where it ships one (two OpenMP runtimes in one process abort it)."""
    if sys.platform != "darwin":
        return ["-fopenmp"], ["-fopenmp"]
    for prefix in LIBOMP:
        if (prefix / "include" / "omp.h").is_file():
            bundled = Path(torch.__file__).parent / "lib"
            lib = bundled if (bundled / "libomp.dylib").is_file() else prefix / "lib"
            return ["-Xpreprocessor", "-fopenmp", f"-I{prefix / 'include'}"], [f"-L{lib}", f"-Wl,-rpath,{lib}",
                                                                               "-lomp"]
    _once("no OpenMP for Apple clang here (brew install libomp): the kernels run on one thread")
    return [], []


def _flags(lvl: str) -> tuple[list[str], list[str]]:
    cflags, ldflags = _openmp()
    return ["-O3", "-fno-math-errno", *_FLAGS[lvl], *cflags], ldflags


@functools.cache
def _build_name(lvl: str) -> str:
    cflags, ldflags = _flags(lvl)
    text = b"".join(source.read_bytes() for source in SOURCES + HEADERS)
    # torch's own location too: two environments with the same torch version build against different headers, and
    # sharing one directory made each rebuild the other's module (silently, a minute or more) on every switch
    key = text + " ".join([platform.machine(), os.environ.get("CXX", ""), str(Path(torch.__file__).parent), *cflags,
                           *ldflags]).encode()
    return f"torch-{torch.__version__}-{lvl}-{hashlib.sha256(key).hexdigest()[:12]}"


def build_dir(lvl: str) -> Path:
    """Where a level's build lives: keyed by level, machine, torch version and location, flags and source text, so
    processes running different checkouts or environments, or machines sharing a cache, never load or rebuild a
    build that is not theirs."""
    return cache_dir() / "kernels" / _build_name(lvl)


def _timings() -> Path:
    return cache_dir() / "kernels" / "build-seconds.json"


def _expected(lvl: str) -> str:
    """How long a build is expected to take: the last one on this machine, else a typical range."""
    try:
        seconds = json.loads(_timings().read_text())[lvl]
        return f"about {seconds:.0f} s, as last time"
    except (OSError, ValueError, KeyError, TypeError):
        return "typically 1-3 minutes on 2 cores"


def _record(lvl: str, seconds: float) -> None:
    try:
        known = json.loads(_timings().read_text()) if _timings().is_file() else {}
        known[lvl] = round(seconds, 1)
        _timings().write_text(json.dumps(known))
    except (OSError, ValueError):
        pass  # only the next estimate is lost


class _Progress:
    """One line while a build runs: its expected duration, and on a terminal the seconds so far."""

    def __init__(self, lvl: str) -> None:
        self.lvl, self.began, self.done = lvl, time.monotonic(), threading.Event()
        self.head = f"draftapprox: compiling the CPU kernels for {lvl} once ({_expected(lvl)})"
        self.tty = sys.stderr.isatty()

    def __enter__(self) -> _Progress:
        print(self.head + ("" if self.tty else " ..."), file=sys.stderr, flush=True)
        if self.tty:
            threading.Thread(target=self._tick, daemon=True).start()
        return self

    def _tick(self) -> None:
        while not self.done.wait(1.0):
            print(f"\r  {time.monotonic() - self.began:.0f} s", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc) -> None:
        self.done.set()
        seconds = time.monotonic() - self.began
        if exc[0] is None:
            _record(self.lvl, seconds)
        end = "built" if exc[0] is None else "failed"
        print(("\r" if self.tty else "") + f"  {end} in {seconds:.0f} s", file=sys.stderr, flush=True)


def _build(lvl: str):
    from torch.utils import cpp_extension

    build = build_dir(lvl)
    build.mkdir(parents=True, exist_ok=True)
    name = f"draftapprox_kernels_{lvl}"
    cflags, ldflags = _flags(lvl)
    fresh = not any(build.glob(f"{name}*.so")) and not any(build.glob(f"{name}*.pyd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not fresh:
            return cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=cflags,
                                      extra_ldflags=ldflags, build_directory=str(build), verbose=False)
        with _Progress(lvl):
            return cpp_extension.load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=cflags,
                                      extra_ldflags=ldflags, build_directory=str(build), verbose=False)


@functools.cache
def load_level(lvl: str):
    """The compiled module of one level (`linear_bf16`, `isa`, `rms_norm`, `decode_attention`,
    `prefill_attention`, `silu_mul_`, `rope`), or None where it cannot be built here (said once)."""
    if lvl not in executable():
        raise ValueError(f"this CPU cannot run kernels built for {lvl} (it runs {', '.join(executable())})")
    try:
        return _build(lvl)
    except (Exception, SystemExit) as exc:  # a compiler's failure has no one type; the loader may also exit
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        _once(f"the compiled CPU kernels for {lvl} could not be built ({first})")
        return None


@functools.cache
def _active() -> tuple[str | None, object]:
    runs = executable()
    for lvl in runs[runs.index(level()):]:
        module = load_level(lvl)
        if module is not None:
            if lvl != level():
                _once(f"using the kernels built for {lvl} instead")
            return lvl, module
    _once("no level of the compiled CPU kernels could be built; using PyTorch")
    return None, None


def load():
    """The compiled module for the level in use (`level`, or the best below it that builds), or None."""
    return _active()[1]


def built() -> str | None:
    """The level of the module `load` returns, or None where none builds."""
    return _active()[0]


def build_key() -> str:
    """The build in use, as its directory names it (level, flags and source digest), or "none"."""
    lvl = built()
    return _build_name(lvl) if lvl else "none"


def reset() -> None:
    """Forget the level in use, so that a changed `DRAFTAPPROX_KERNEL_ISA` takes effect (tests); builds already
    loaded stay loaded."""
    _active.cache_clear()


def vectorised() -> bool:
    """Whether the kernels are built here with wide vectors (AVX2 or AVX-512): the portable build's 4-wide vectors
    are no match for PyTorch's own AVX2/AVX-512 loops, so callers with a PyTorch alternative then use PyTorch."""
    lvl = built()
    return lvl is not None and lvl != "portable"


def call(name: str, *args):
    """`load().<name>(*args)`, named `draftapprox::<name>` to torch.profiler, which does not see a pybind call on
    its own."""
    fn = getattr(load(), name)
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"draftapprox::{name}"):
            return fn(*args)
    return fn(*args)
