"""Per-thread CPU buffers for the large temporaries of a prefill chunk, faulted in once instead of every time.

glibc serves an allocation above 32 MB with a fresh `mmap` and unmaps it when freed, so each such tensor is
faulted in page by page and zeroed by the kernel as it is first written. A 1k-token prefill of the 1.5B target
allocated 2 GB this way (the gate and up projections' outputs, 37 MB each per layer): 527k page faults and 2-4 s
of system time against a 13 s forward. Reusing one buffer per role took the faults to 28k.
"""

from __future__ import annotations

import math
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
