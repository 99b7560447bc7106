"""`serve`: the OpenAI-compatible server (see `draftapprox.serve`)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from ..errors import ConfigError
from .common import (
    CacheOpt,
    DeviceOpt,
    DraftDtypeOpt,
    DraftOpt,
    DtypeOpt,
    SetOpt,
    SpeculativeOpt,
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
    method: Annotated[str | None, typer.Option(
        "--method", "-m", help="Default method (speckv; with --upstream: specpc, or none).")] = None,
    budget: Annotated[str | None, typer.Option(
        "--budget", "-b", help="Tokens (256) or a ratio of the prompt (0.25); with --upstream also a keep curve by "
                               "prompt length, LENGTH:RATIO,... (4096:1.0,8192:0.5,32768:0.25). Default: the "
                               "method's own (0.25 with --upstream).")] = None,
    knob: SetOpt = None,
    draft: DraftOpt = None,
    target: TargetOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="DRAFTAPPROX_API_KEY", help="Require this Bearer token on /v1 routes.")] = None,
    kv_cache_memory: Annotated[str, typer.Option(
        help="KV bytes all running requests may hold after compression; admission waits beyond it.")] = "4GiB",
    max_queue: Annotated[int, typer.Option(help="Requests that may wait (for admission, or for the draft "
                                                "with --upstream); more get 429.")] = 64,
    prefill_chunk: Annotated[str, typer.Option(
        help="Prompt tokens prefilled between two decode steps of the running requests; auto: as many as take "
             "about three decode steps.")] = "auto",
    lookahead: Annotated[int, typer.Option(
        help="Draft tokens a lookahead method (SpecKV) writes unless a request sets its own.")] = 32,
    request_timeout: Annotated[float | None, typer.Option(
        help="Seconds a request may take, queue included, before it ends with an error.")] = None,
    shutdown_timeout: Annotated[float, typer.Option(
        help="Seconds running requests get to finish on SIGTERM before they are cancelled.")] = 30.0,
    served_model_name: Annotated[str | None, typer.Option(
        help="The model name clients send (default: the target's folder or id, or the upstream's model).")] = None,
    upstream: Annotated[str | None, typer.Option(
        help="Proxy mode: an OpenAI base URL (http://HOST:PORT/v1) of the engine that answers; only the draft is "
             "loaded, and the proxy waits for an engine that is not up yet.")] = None,
    upstream_model: Annotated[str | None, typer.Option(help="The upstream's model (default: the first it lists).")]
    = None,
    upstream_api_key: Annotated[str | None, typer.Option(envvar="DRAFTAPPROX_UPSTREAM_API_KEY",
                                                         help="Bearer token sent to the upstream.")] = None,
    upstream_timeout: Annotated[float, typer.Option(
        help="Seconds without a byte from the upstream before a request ends with 504.")] = 600.0,
    min_prompt_tokens: Annotated[int, typer.Option(
        help="With --upstream: shorter prompts are forwarded uncut (the draft pass would not pay).")] = 1024,
    chat_forward: Annotated[str, typer.Option(
        help="With --upstream: ids (render the chat here, forward token ids: exact) or messages (forward the "
             "compressed contents to the upstream's chat route).")] = "ids",
    prefix_reuse: Annotated[bool, typer.Option(
        help="With --upstream: forward whole a prompt the upstream's prefix cache mostly holds, or one that repeats "
             "an earlier prompt's long prefix (a second question on a document), instead of cutting it.")] = True,
    allow_text: Annotated[bool, typer.Option(
        help="With --upstream: cut and forward text when the upstream's tokenizer differs from the draft's (else "
             "such prompts pass uncut).")] = False,
    compress_timeout: Annotated[float | None, typer.Option(
        help="With --upstream: seconds a prompt may wait for and spend in the draft before it is forwarded uncut "
             "(or fails, with --on-compress-error fail).")] = 120.0,
    on_compress_error: Annotated[str, typer.Option(
        help="With --upstream: forward (the prompt goes uncut, counted in /metrics) or fail (an error of ours) when "
             "compressing fails, times out or finds the draft's queue full.")] = "forward",
    model_budget: Annotated[list[str] | None, typer.Option(
        help="With --upstream: MODEL=BUDGET for requests to one of the engine's models (a count, a ratio or a keep "
             "curve); repeatable.")] = None,
    static_decode: Annotated[bool | None, typer.Option(
        "--static-decode/--no-static-decode",
        help="Decode batches over fixed-shape storage, replayed as a CUDA graph on a GPU (default: on a GPU only; on "
             "a CPU it runs eagerly, the same tokens).")] = None,
    speculative: SpeculativeOpt = "0",
    dtype: DtypeOpt = "auto",
    draft_dtype: DraftDtypeOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    cache_dir: CacheOpt = None,
) -> None:
    """Serve the OpenAI API (completions and chat, streaming or not) with a method per request."""
    from ..models import offline
    from ..serve.app import create_app, serve_app
    from ..serve.metrics import Metrics
    from ..serve.proxy.prefix import PrefixLedger
    from ..serve.responses import Service
    from ..speculative import parse

    memory = parse_bytes(kv_cache_memory)
    proposals = parse(speculative)
    if proposals and upstream is not None:
        raise ConfigError("--speculative decodes on this server's target; with --upstream the engine decodes")
    if proposals and static_decode:
        raise ConfigError("--speculative feeds several tokens a step; it does not run with --static-decode")
    try:
        chunk = None if prefill_chunk == "auto" else int(prefill_chunk)
    except ValueError:
        raise ConfigError(f"--prefill-chunk must be auto or a token count, got {prefill_chunk!r}") from None
    for name, value, least in (("--port", port, 0), ("--max-queue", max_queue, 0),
                               ("--prefill-chunk", 1 if chunk is None else chunk, 1), ("--lookahead", lookahead, 0),
                               ("--min-prompt-tokens", min_prompt_tokens, 0)):
        if value < least:
            raise ConfigError(f"{name} must be >= {least}, got {value}")
    for name, value in (("--request-timeout", request_timeout), ("--upstream-timeout", upstream_timeout)):
        if value is not None and value <= 0:
            raise ConfigError(f"{name} must be > 0 seconds, got {value}")
    if chat_forward not in ("ids", "messages"):
        raise ConfigError(f"--chat-forward must be ids or messages, got {chat_forward!r}")
    if on_compress_error not in ("forward", "fail"):
        raise ConfigError(f"--on-compress-error must be forward or fail, got {on_compress_error!r}")
    if compress_timeout is not None and compress_timeout <= 0:
        raise ConfigError(f"--compress-timeout must be > 0 seconds, got {compress_timeout}")
    curve = budget is not None and ":" in budget  # a keep curve, LENGTH:RATIO,...
    if upstream is None and (model_budget or curve):
        raise ConfigError("keep curves and --model-budget are the proxy's: they need --upstream")
    metrics = Metrics()
    if upstream is None:
        from ..models.loading import load_pair
        from ..serve.local import LocalBackend
        from ..serve.scheduler import Scheduler

        chosen = method_from(method or "speckv", budget, knob)
        pair = load_pair(draft, target, dtype=dtype, draft_dtype=draft_dtype, device=device, threads=threads,
                         cache=cache_dir, log=err.print)
        name = served_model_name or Path(str(target or offline.TARGET.name)).name
        scheduler = Scheduler(pair, kv_cache_memory=memory, max_queue=max_queue, prefill_chunk=chunk,
                              metrics=metrics, static_decode=False if proposals else static_decode)
        service = Service(pair, LocalBackend(scheduler), name, chosen, lookahead=lookahead,
                          request_timeout=request_timeout, speculative=proposals)
        app = create_app(service, api_key=api_key, shutdown_timeout=shutdown_timeout)
        err.print(f"serving {name} with {chosen.describe()} by default on http://{host}:{port}/v1, KV pool "
                  f"{memory / 2**20:.0f} MiB")
    else:
        from ..methods import PromptMethod
        from ..models.loading import Pair, load_model
        from ..serve.proxy.app import create_proxy_app
        from ..serve.proxy.budgets import Budgets
        from ..serve.proxy.compressor import Compressor
        from ..serve.proxy.handler import Proxy
        from ..serve.proxy.link import Link, Upstream
        from ..serve.proxy.relay import Relay

        if not upstream.startswith(("http://", "https://")) or not upstream.rstrip("/").endswith("/v1"):
            raise ConfigError(f"--upstream must be an OpenAI base URL, http(s)://HOST:PORT/v1, got {upstream!r}")
        budgets = Budgets.parse(budget if curve else None, model_budget)
        chosen = None if method == "none" else method_from(method or "specpc", None if curve else budget or "0.25",
                                                           knob)
        if chosen is not None and (not isinstance(chosen, PromptMethod) or chosen.needs_target):
            raise ConfigError(f"--upstream serves prompt methods that need no target (specpc, specprefill, "
                              f"randompc, recencypc) or none, not {chosen.name}")
        if target is not None:
            raise ConfigError("--target is the engine's with --upstream: the proxy loads only the draft")
        if chosen is not None:
            budgets.check(chosen)
        model, tokenizer = load_model(draft if draft is not None else offline.DRAFT.name,
                                      dtype=draft_dtype or dtype, device=device, threads=threads, cache=cache_dir,
                                      log=err.print)
        pair = Pair(model, tokenizer, model)  # the draft stands in for the target's tokenizer checks
        link = Link(Upstream(upstream.rstrip("/"), upstream_model, upstream_api_key, upstream_timeout), tokenizer,
                    allow_text=allow_text)
        if not link.refresh(force=True):
            err.print(f"waiting for the upstream: {link.problem} (/health answers 503 until it does)")
        proxy = Proxy(pair, link, Compressor(pair, metrics, max_queue=max_queue, timeout=compress_timeout,
                                             on_error=on_compress_error),
                      Relay(link), metrics, chosen, budgets, served_model_name, min_prompt_tokens,
                      chat_forward == "messages", PrefixLedger() if prefix_reuse else None)
        app = create_proxy_app(proxy, api_key=api_key)
        shown = chosen.describe() if chosen is not None else "none"
        err.print(f"serving {shown}{f' at {budget}' if curve else ''} by default on http://{host}:{port}/v1, in "
                  f"front of {link.upstream.url}")
    serve_app(app, host=host, port=port, shutdown_timeout=shutdown_timeout)
