"""From a validated request to its answer: the method it asked for, a job on the scheduler, and the OpenAI response
object (or its stream of server-sent events) built from the job's events.

Completions and chat share all of this; they differ only in how the prompt becomes token ids and in the shape of
a choice (`text` against `message`/`delta`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ConfigError
from ..generation import Result, Sampling
from ..methods import Method, make
from ..models.loading import Pair
from .protocol import ApiError, Options, error_body
from .scheduler import Done, Failed, Job, Rejected, Scheduler, Token


@dataclass
class Service:
    """What the routes share: the models, the scheduler, and the server's defaults."""

    pair: Pair
    scheduler: Scheduler
    model_name: str
    method: Method  # the default method
    lookahead: int = 32  # draft tokens a lookahead method writes unless the request says otherwise
    request_timeout: float | None = None
    completion_max_tokens: int = 16  # the OpenAI API's default for /v1/completions
    chat_max_tokens: int = 512


def choose_method(service: Service, options: Options | None) -> Method:
    """The request's method: the server's default unless `draftapprox` names another, budget and knobs applied.

    Knobs and budget the request does not give come from the server's default when it names the default method,
    and from the method's own defaults otherwise. A lookahead left unset is bounded by the server's `lookahead`
    rather than the request's `max_tokens`, which could be thousands.
    """
    default = service.method
    if options is None or (options.method is None and options.budget is None and not options.settings):
        method = default
        explicit: set[str] = set()
    else:
        name = (options.method or default.name).lower()
        base = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)} if name == default.name \
            else {}
        settings = {k: v for k, v in base.items() if k != "budget"} | options.settings
        budget = options.budget if options.budget is not None else base.get("budget")
        try:
            method = make(name, budget, **settings)
        except ConfigError as error:
            text = str(error)
            param = ("draftapprox.method" if "unknown method" in text else "draftapprox.budget"
                     if "budget" in text.split(":", 1)[-1][:20] else "draftapprox.settings")
            raise ApiError(400, str(error), param=param) from None
        explicit = set(options.settings)
    if method.needs_draft and service.pair.draft is None:
        raise ApiError(400, f"{method.name} needs a draft model and this server has none", param="draftapprox.method")
    if getattr(method, "lookahead", 0) is None and "lookahead" not in explicit:
        method = dataclasses.replace(method, lookahead=service.lookahead)
    return method


def sampling(request) -> Sampling:
    temperature = 1.0 if request.temperature is None else float(request.temperature)
    top_p = 1.0 if request.top_p is None else float(request.top_p)
    return Sampling(temperature, top_p, request.seed)


class TextStream:
    """Incremental text of a growing token list, holding back what may still change: a partial UTF-8 character,
    and the last characters that could be the start of a stop string."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.tokens, self.sent = tokenizer, [], ""
        self.hold = max((len(s) for s in stop), default=1) - 1

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        safe = len(text) - self.hold
        while safe > 0 and text[safe - 1] == "\ufffd":
            safe -= 1
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):safe], text[:safe]
        return delta

    def finish(self, final: str) -> str:
        """The rest of the final text (stop strings cut) after what was sent."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""


def _finish_reason(result: Result) -> str:
    return "length" if result.record.stop_reason == "length" else "stop"


def _usage(result: Result) -> dict:
    prompt, completion = result.record.prompt_tokens, result.record.new_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _extension(result: Result, method: Method) -> dict:
    """The `draftapprox` object: the keys of `generate --json`, less the text."""
    return {**result.record.to_dict(), "config": method.describe()}


async def respond(service: Service, http: Request, body, ids: torch.Tensor,
                  chat: bool) -> JSONResponse | StreamingResponse:
    """Run one request to its answer. `body`: the validated request; `ids (1, n)`: its prompt's token ids."""
    method = choose_method(service, body.draftapprox)
    max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None) or (
        service.chat_max_tokens if chat else service.completion_max_tokens)
    limit = service.pair.context_length
    if limit and ids.shape[1] + max_tokens > limit:
        if body.max_tokens is None and getattr(body, "max_completion_tokens", None) is None and ids.shape[1] < limit:
            max_tokens = limit - ids.shape[1]  # a default never makes a request fail
        else:
            raise ApiError(400, f"the prompt has {ids.shape[1]} tokens; with max_tokens={max_tokens} that exceeds "
                                f"the model's context of {limit}", param="max_tokens")
    try:
        chosen_sampling = sampling(body)
    except ConfigError as error:
        raise ApiError(400, str(error)) from None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def deliver(event) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody is listening
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(ids, method, max_tokens, chosen_sampling, body.stop or [], deliver, timeout=service.request_timeout,
              ignore_eos=body.ignore_eos)
    try:
        service.scheduler.submit(job)
    except Rejected as error:
        headers = {"Retry-After": str(int(error.retry_after))} if error.retry_after else None
        raise ApiError(error.status, str(error), type="server_error" if error.status >= 500 else
                       "invalid_request_error", code={429: "queue_full", 503: "unavailable"}.get(error.status),
                       headers=headers) from None
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.model_name}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(service, job, events, meta, method, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _gather(service, http, job, events, meta, method, chat)


async def _next(events: asyncio.Queue, http: Request | None, job: Job, service: Service):
    """The job's next event; cancels the job if the client went away meanwhile (non-streaming requests)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.25)
        except asyncio.TimeoutError:
            if http is not None and await http.is_disconnected():
                service.scheduler.cancel(job)
                raise asyncio.CancelledError from None


async def _gather(service: Service, http: Request, job: Job, events: asyncio.Queue, meta: dict, method: Method,
                  chat: bool) -> JSONResponse:
    try:
        while True:
            event = await _next(events, http, job, service)
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, type=event.type)
            if isinstance(event, Done):
                break
    except asyncio.CancelledError:
        service.scheduler.cancel(job)
        raise
    result = event.result
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                  "finish_reason": _finish_reason(result), "logprobs": None}
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": _finish_reason(result), "logprobs": None}
    service.scheduler.metrics.requests.labels("200").inc()
    return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                         "usage": _usage(result), "draftapprox": _extension(result, method)})


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _stream(service: Service, job: Job, events: asyncio.Queue, meta: dict, method: Method, chat: bool,
                  include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"
    text = TextStream(service.pair.tokenizer, job.stop)

    def chunk(delta: str, finish: str | None = None, **extra) -> dict:
        if chat:
            choice = {"index": 0, "delta": {"content": delta}, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        return {**meta, "object": obj, "choices": [choice], **extra}

    status = "200"
    try:
        if chat:
            yield _sse({**meta, "object": obj, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                            "finish_reason": None, "logprobs": None}]})
        while True:
            event = await _next(events, None, job, service)
            if isinstance(event, Token):
                delta = text.push(event.token)
                if delta:
                    yield _sse(chunk(delta))
            elif isinstance(event, Failed):
                status = str(event.status)
                yield _sse(error_body(event.message, event.type))
                break
            else:
                result = event.result
                yield _sse(chunk(text.finish(result.text), _finish_reason(result), usage=_usage(result),
                                 draftapprox=_extension(result, method)))
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(result),
                                "draftapprox": _extension(result, method)})
                break
        yield _sse("[DONE]")
    finally:  # a client that went away mid-stream lands here too: its work stops at the next step
        service.scheduler.cancel(job)
        service.scheduler.metrics.requests.labels(status).inc()
