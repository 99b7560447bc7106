"""Per-thread CPU buffers for the large temporaries of a prefill chunk, faulted in once instead of every time, and
a heap that keeps what the smaller ones free.

glibc serves an allocation above 32 MB with a fresh `mmap` and unmaps it when freed, so each such tensor is
faulted in page by page and zeroed by the kernel as it is first written: a long prefill's gate and up projection
outputs, every layer, cost seconds of system time this way. Reusing one buffer per role faults them in once
(docs/results/archive/profile.md).

Below 32 MB, glibc serves from its heap, but by default gives the heap's top back to the OS as soon as more than
128 kB of it is free, so each layer's fresh activations were faulted in again as well; `keep_heap` raises that
threshold (docs/results/archive/profile-amx.md). The price is up to `KEPT_HEAP`
of freed memory held for reuse; `malloc_trim` (which the benchmark calls before measuring memory) still returns it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import threading

import torch

_local = threading.local()


def buffer(role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor of `shape` for `role`, on this thread's storage for that role and dtype.

    It is overwritten by the next call with the same role on the same thread, so a caller must be done with it by
    then. One forward runs its layers one after another, and a draft in a worker thread has storage of its own, so
    a role per temporary is enough. The storage grows to the largest shape asked for and is kept."""
    pool = _local.__dict__.setdefault("pool", {})
    numel = math.prod(shape)
    flat = pool.get((role, dtype))
    if flat is None or flat.numel() < numel:
        pool.pop((role, dtype), None)  # free the smaller one before taking the larger
        with torch.inference_mode(False):  # a normal tensor: written in place both in and out of inference mode
            flat = pool[(role, dtype)] = torch.empty(numel, dtype=dtype)
    return flat[:numel].view(shape)


KEPT_HEAP = 1 << 30
"""Freed heap memory glibc keeps for reuse before it returns the top of the heap to the OS."""
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3  # mallopt's parameter numbers (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_heap() -> None:
    """Hand freed heap memory back to the OS now (glibc's `malloc_trim`), whatever `keep_heap` keeps: what a
    memory measurement's baseline must not include."""
    with contextlib.suppress(AttributeError):
        if _libc() is not None:
            _libc().malloc_trim(0)


@functools.cache
def keep_heap() -> bool:
    """Have glibc keep freed heap memory for reuse (once per process; a no-op elsewhere, or with
    `DRAFTAPPROX_KEEP_HEAP=0`). Returns whether it took effect."""
    libc = _libc()
    if os.environ.get("DRAFTAPPROX_KEEP_HEAP", "1") == "0" or libc is None:
        return False
    settings = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, KEPT_HEAP), (_M_TOP_PAD, 64 << 20))
    try:
        return all(libc.mallopt(param, value) == 1 for param, value in settings)
    except AttributeError:
        return False
