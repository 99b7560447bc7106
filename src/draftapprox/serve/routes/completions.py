"""`POST /v1/completions`: a text or token-id prompt, answered by the scheduler."""

from __future__ import annotations

import torch
from fastapi import APIRouter, Depends, Request

from ...errors import InputError
from ...generation import check_ids, encode
from ..auth import authorized
from ..protocol import ApiError, CompletionRequest
from ..responses import respond
from .common import ServiceDep, check_request

router = APIRouter()


@router.post("/v1/completions", dependencies=[Depends(authorized)])
async def completions(body: CompletionRequest, http: Request, svc: ServiceDep):
    check_request(svc, body)
    prompt = body.single_prompt()
    try:
        if isinstance(prompt, str):
            ids = encode(svc.pair, prompt)
        else:
            ids = check_ids(svc.pair, torch.tensor([prompt], dtype=torch.long))
    except InputError as error:
        raise ApiError(400, str(error), param="prompt") from None
    return await respond(svc, http, body, ids, chat=False)

