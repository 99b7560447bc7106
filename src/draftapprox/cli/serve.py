"""`serve`: the OpenAI-compatible server (see `draftapprox.serve`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from .common import (
    BudgetOpt,
    CacheOpt,
    DeviceOpt,
    DraftDtypeOpt,
    DraftOpt,
    DtypeOpt,
    MethodOpt,
    SetOpt,
    TargetOpt,
    ThreadsOpt,
    app,
    err,
    method_from,
)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB', '4GiB', '1.5GB', '1000000' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match and match.group(2).lower()
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ConfigError(f"--kv-cache-memory must be a positive size such as 512MiB or 4GiB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


@app.command()
def serve(
    method: MethodOpt = "speckv",
    budget: BudgetOpt = None,
    knob: SetOpt = None,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="DRAFTAPPROX_API_KEY", help="Require this Bearer token on /v1 routes.")] = None,
    kv_cache_memory: Annotated[str, typer.Option(
        help="KV bytes all running requests may hold after compression; admission waits beyond it.")] = "4GiB",
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for admission; more get 429.")] = 64,
    prefill_chunk: Annotated[int, typer.Option(
        help="Prompt tokens prefilled between two decode steps of the running requests.")] = 64,
    lookahead: Annotated[int, typer.Option(
        help="Draft tokens a lookahead method (SpecKV) writes unless a request sets its own.")] = 32,
    request_timeout: Annotated[float | None, typer.Option(
        help="Seconds a request may take, queue included, before it ends with an error.")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        help="Seconds running requests get to finish on SIGTERM before they are cancelled.")] = 30.0,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model name clients send (default: the target's folder or id).")] = None,
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Serve the OpenAI API (completions and chat, streaming or not) with a method per request."""
    from ..models import offline
    from ..models.loading import load_pair
    from ..serve.app import run
    from ..serve.local import LocalBackend
    from ..serve.metrics import Metrics
    from ..serve.responses import Service
    from ..serve.scheduler import Scheduler

    chosen = method_from(method, budget, knob)
    memory = parse_bytes(kv_cache_memory)
    for name, value, least in (("--port", port, 0), ("--max-queue", max_queue, 0),
                               ("--prefill-chunk", prefill_chunk, 1), ("--lookahead", lookahead, 0)):
        if value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    if request_timeout is not None and request_timeout <= 0:
        raise ConfigError(f"--request-timeout must be > 0 seconds, got {request_timeout}")
    pair = load_pair(draft, target, dtype=dtype, draft_dtype=draft_dtype, device=device, threads=threads,
                     cache=cache_dir, log=err.print)
    name = served_model_name or Path(str(target or offline.TARGET.name)).name
    scheduler = Scheduler(pair, kv_cache_memory=memory, max_queue=max_queue, prefill_chunk=prefill_chunk,
                          metrics=Metrics())
    service = Service(pair, LocalBackend(scheduler), name, chosen, lookahead=lookahead,
                      request_timeout=request_timeout)
    err.print(f"serving {name} with {chosen.describe()} by default on http://{host}:{port}/v1 "
              f"(KV pool {memory / 2**20:.0f} MiB)")
    run(service, host=host, port=port, api_key=api_key, shutdown_timeout=shutdown_timeout)
