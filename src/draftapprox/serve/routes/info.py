"""The server's own routes: `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text format)."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from ..auth import authorized
from .common import ServiceDep

router = APIRouter()
_STARTED = int(time.time())


@router.get("/v1/models", dependencies=[Depends(authorized)])
async def models(svc: ServiceDep) -> dict:
    return {"object": "list", "data": [{"id": svc.model_name, "object": "model", "created": _STARTED,
                                        "owned_by": "draftapprox", "max_model_len": svc.context}]}


@router.get("/health")
async def health() -> dict:
    return {"status": "ok"}


@router.get("/metrics")
async def metrics(svc: ServiceDep) -> Response:
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)
