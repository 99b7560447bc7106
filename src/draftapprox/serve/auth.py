"""The API key check both servers share: a Bearer token equal to `--api-key`, when there is one (as vLLM's server
checks it)."""

from __future__ import annotations

import hmac

from fastapi import Request

from .protocol import ApiError


def authorized(request: Request) -> None:
    key = request.app.state.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", type="authentication_error",
                       code="invalid_api_key")
