"""From a validated request to its answer on our own server: the method it asked for, the work handed to the
backend (the scheduler), and the OpenAI response object, or its stream of server-sent events, built from the
backend's events.

Completions and chat share all of this; they differ only in how the prompt becomes token ids and in the shape of
a choice (`text` against `message`/`delta`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import ConfigError
from ..generation import Sampling
from ..methods import Method, make
from ..models.loading import Pair
from ..speculative import parse as parse_speculative
from .events import Delta, Failed, Finished
from .metrics import Metrics
from .protocol import ApiError, Options, error_body, with_specprefill
from .request import Disconnected, Work


class Backend(Protocol):
    metrics: Metrics

    def start(self) -> None: ...

    def stop(self, timeout: float) -> None: ...

    def open(self, work: Work) -> AsyncIterator[Delta | Finished | Failed]: ...


@dataclass
class Service:
    """What the routes share: the tokenizer side of the models, the backend, and the server's defaults.

    `pair` tokenizes and checks prompts and runs them."""

    pair: Pair
    backend: Backend
    model_name: str
    method: Method  # the default method
    lookahead: int = 32  # draft tokens a lookahead method writes unless the request says otherwise
    request_timeout: float | None = None
    completion_max_tokens: int = 16  # the OpenAI API's default for /v1/completions
    chat_max_tokens: int = 512
    context_length: int | None = None  # default: the target's
    speculative: int | str = 0  # draft tokens proposed per decode step unless a request says otherwise

    @property
    def metrics(self) -> Metrics:
        return self.backend.metrics

    @property
    def context(self) -> int:
        return self.context_length or self.pair.context_length


def requested_method(default: Method | None, options: Options | None) -> tuple[Method | None, set[str]]:
    """The method a request's `draftapprox` field asks for, and the knobs it set itself.

    Knobs and budget the request does not give come from the server's default when it names the default method,
    and from the method's own defaults otherwise. Shared by our own server and the proxy."""
    if options is None or (options.method is None and options.budget is None and not options.settings):
        return default, set()
    name = (options.method or (default.name if default else "")).lower()
    base = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)} \
        if default is not None and name == default.name else {}
    settings = {k: v for k, v in base.items() if k != "budget"} | options.settings
    budget = options.budget if options.budget is not None else base.get("budget")
    try:
        return make(name, budget, **settings), set(options.settings)
    except ConfigError as error:
        text = str(error)
        param = ("draftapprox.method" if "unknown method" in text else "draftapprox.budget"
                 if "budget" in text.split(":", 1)[-1][:20] else "draftapprox.settings")
        raise ApiError(400, text, param=param) from None


def choose_method(service: Service, options: Options | None) -> Method:
    """The request's method on our own server: `requested_method`, checked against the loaded models. A lookahead
    left unset is bounded by the server's `lookahead` rather than the request's `max_tokens`, which could be
    thousands."""
    method, explicit = requested_method(service.method, options)
    if method.needs_draft and service.pair.draft is None:
        raise ApiError(400, f"{method.name} needs a draft model and this server has none", param="draftapprox.method")
    if getattr(method, "lookahead", 0) is None and "lookahead" not in explicit:
        method = dataclasses.replace(method, lookahead=service.lookahead)
    return method


def choose_speculative(service: Service, options: Options | None) -> int | str:
    """The request's speculative decoding setting (default: the server's), checked against the loaded models."""
    asked = options.speculative if options is not None else None
    if asked is None:
        return service.speculative
    try:
        proposals = parse_speculative(asked)
    except ConfigError as error:
        raise ApiError(400, str(error), param="draftapprox.speculative") from None
    if proposals and service.pair.draft is None:
        raise ApiError(400, "speculative decoding needs a draft model and this server has none",
                       param="draftapprox.speculative")
    return proposals


def sampling(request) -> Sampling:
    temperature = 1.0 if request.temperature is None else float(request.temperature)
    top_p = 1.0 if request.top_p is None else float(request.top_p)
    try:
        return Sampling(temperature, top_p, request.seed)
    except ConfigError as error:
        raise ApiError(400, str(error)) from None


def _max_tokens(service: Service, body, n: int, chat: bool) -> int:
    asked = body.max_tokens or getattr(body, "max_completion_tokens", None)
    max_tokens = asked or (service.chat_max_tokens if chat else service.completion_max_tokens)
    limit = service.context
    if limit and n + max_tokens > limit:
        if asked is None and n < limit:
            return limit - n  # a default never makes a request fail
        raise ApiError(400, f"the prompt has {n} tokens; with max_tokens={max_tokens} that exceeds the model's "
                            f"context of {limit}", param="max_tokens")
    return max_tokens


async def respond(service: Service, http: Request, body, ids: torch.Tensor,
                  chat: bool) -> JSONResponse | StreamingResponse:
    """Run one request to its answer. `body`: the validated request; `ids (1, n)`: its prompt's token ids."""
    options = with_specprefill(body.draftapprox, body.specprefill, body.specprefill_keep_pct, off="fullkv")
    method = choose_method(service, options)
    work = Work(ids, method, _max_tokens(service, body, ids.shape[1], chat), sampling(body), body.stop or [],
                body.ignore_eos, http, service.request_timeout, choose_speculative(service, options))
    events = service.backend.open(work)
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": service.model_name}
    first = await _first(events)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(service, first, events, meta, chat, include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _gather(service, first, events, meta, chat)


async def _first(events: AsyncIterator) -> Delta | Finished:
    """The first event, awaited before a response starts, so that a refusal or a failure before the first token
    (a full queue, a prompt that cannot be run) is an HTTP error, not a broken stream."""
    try:
        event = await anext(events)
    except Disconnected:
        raise ApiError(499, "the client closed the request", code="client_closed") from None
    if isinstance(event, Failed):
        raise ApiError(event.status, event.message, type=event.type)
    return event


async def _gather(service: Service, first, events: AsyncIterator, meta: dict, chat: bool) -> JSONResponse:
    event = first
    try:
        while not isinstance(event, Finished):
            event = await anext(events)
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message, type=event.type)
    except Disconnected:
        raise ApiError(499, "the client closed the request", code="client_closed") from None
    finally:
        await events.aclose()
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": event.text},
                  "finish_reason": event.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": event.text, "finish_reason": event.finish_reason, "logprobs": None}
    service.metrics.requests.labels("200").inc()
    return JSONResponse({**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                         "usage": event.usage, "draftapprox": event.extension})


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _stream(service: Service, first, events: AsyncIterator, meta: dict, chat: bool,
                  include_usage: bool) -> AsyncIterator[bytes]:
    obj = "chat.completion.chunk" if chat else "text_completion"

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
        event = first
        while True:
            if isinstance(event, Delta):
                yield _sse(chunk(event.text))
            elif isinstance(event, Failed):
                status = str(event.status)
                yield _sse(error_body(event.message, event.type))
                break
            else:
                yield _sse(chunk(event.rest, event.finish_reason, usage=event.usage, draftapprox=event.extension))
                if include_usage:
                    yield _sse({**meta, "object": obj, "choices": [], "usage": event.usage,
                                "draftapprox": event.extension})
                break
            event = await anext(events)
        yield _sse("[DONE]")
    finally:  # a client that went away mid-stream lands here too: the backend stops its work
        await events.aclose()
        service.metrics.requests.labels(status).inc()
