"""Dependencies every route shares: the service of the app, and the API key check."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from ..protocol import ApiError
from ..responses import Service


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


def authorized(request: Request) -> None:
    """A Bearer token equal to the server's `--api-key`, when it has one (as vLLM's server checks it)."""
    key = request.app.state.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", type="authentication_error",
                       code="invalid_api_key")


def check_request(svc: Service, body) -> None:
    """What every generation route checks first: the model's name, and the fields we refuse."""
    if body.model != svc.model_name:
        raise ApiError(400, f"unknown model {body.model!r}; this server serves {svc.model_name!r}", param="model",
                       code="model_not_found")
    body.refuse_unsupported()
