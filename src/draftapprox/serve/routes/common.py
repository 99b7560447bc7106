"""Dependencies every route shares: the service of the app, the API key check (`serve.auth`), and the checks of
a generation request."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..protocol import ApiError
from ..responses import Service


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]


def check_request(svc: Service, body) -> None:
    """What every generation route checks first: the model's name, and the fields we refuse."""
    if body.model != svc.model_name:
        raise ApiError(400, f"unknown model {body.model!r}; this server serves {svc.model_name!r}", param="model",
                       code="model_not_found")
    body.refuse_unsupported()
