"""Choices between a compiled kernel and PyTorch that only a measurement settles, each made once per CPU, torch
version and kernel build, and remembered on disk beside the builds.

A probe times every candidate at the shapes it is asked about (best of a few runs after a warm-up) and keeps the
fastest; `verdicts` lists what was decided on this machine, for `draftapprox doctor`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..paths import cache_dir


@functools.cache
def cpu_name() -> str:
    """The CPU's model name with its family and model numbers where Linux's /proc/cpuinfo gives them (a VM may
    name only the vendor's line, "AMD EPYC", for every generation), else what the platform says."""
    try:
        fields: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())
        if "model name" in fields:
            numbers = f" (family {fields['cpu family']}, model {fields['model']})" if "cpu family" in fields else ""
            return fields["model name"] + numbers
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _file() -> Path:
    return cache_dir() / "kernels" / "probes.json"


def _machine(build: str) -> str:
    """What a verdict holds for: the CPU, torch, the kernel build and the threads (a one-thread process's verdict
    is not a many-thread server's)."""
    return f"{cpu_name()} | torch {torch.__version__} | {build} | {torch.get_num_threads()} threads"


def _read() -> dict:
    try:
        return json.loads(_file().read_text())
    except (OSError, ValueError):
        return {}


def _write(known: dict) -> None:
    """Replace the file in one step, so that a process reading it never sees half of it."""
    try:
        _file().parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=_file().parent, suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump(known, out, indent=1, sort_keys=True)
        os.replace(tmp, _file())
    except OSError:
        pass  # the verdict holds for this process; the next one measures again


def best(fn: Callable[[], object], repeats: int = 7) -> float:
    """Seconds of the fastest of `repeats` runs after a warm-up: what the machine can do, not what it did while
    something else ran (a probe's verdict, a limit, a kernel's speed in a regression guard)."""
    fn()
    fastest = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


_decided: dict[tuple[str, str], dict] = {}  # (machine, question): verdict, this process's (a write may fail)
log = logging.getLogger(__name__)


def choose(build: str, question: str, candidates: Callable[[], dict[str, Callable[[], object]]],
           repeats: int = 3) -> str:
    """The fastest of the runs `candidates()` makes (name: a run at the shapes in question), measured once for
    this machine and `build` and remembered; `question` names the choice and its shapes. `candidates` is called
    only when a measurement is needed, so that a decided question costs a dictionary lookup."""
    machine = _machine(build)
    key = (machine, question)
    if key in _decided:
        return _decided[key]["choice"]
    verdict = _read().get(machine, {}).get(question)
    valid = isinstance(verdict, dict) and verdict.get("choice") in (verdict.get("seconds") or {})
    if not valid:
        verdict = _measure(question, candidates, repeats)
        known = _read()  # another process may have written meanwhile
        known.setdefault(machine, {})[question] = verdict
        _write(known)
    _decided[key] = verdict
    return verdict["choice"]


def _measure(question: str, candidates: Callable[[], dict[str, Callable[[], object]]], repeats: int) -> dict:
    """Each candidate's best time; one that fails is left out (and said), so a probe never fails a request while
    another candidate runs."""
    seconds, failed = {}, None
    with torch.inference_mode():
        for name, run in candidates().items():
            try:
                seconds[name] = best(run, repeats)
            except Exception as error:  # the probe's own inputs: what fails here fails for this machine
                failed = error
                log.warning("draftapprox: probing %s, %s failed (%s); not using it", question, name, error)
    if not seconds:
        raise failed
    return {"choice": min(seconds, key=seconds.get), "seconds": {k: round(v, 6) for k, v in seconds.items()}}


def verdicts(build: str) -> dict[str, dict]:
    """What the probes decided on this machine for `build`: question -> {"choice", "seconds"}, this process's
    verdicts included."""
    machine = _machine(build)
    return {**_read().get(machine, {}), **{q: v for (m, q), v in _decided.items() if m == machine}}
