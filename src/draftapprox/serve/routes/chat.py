"""`POST /v1/chat/completions`: messages rendered by the target's chat template, answered by the scheduler."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from ...errors import InputError
from ...generation import encode_messages
from ..auth import authorized
from ..protocol import ApiError, ChatRequest
from ..responses import respond
from .common import ServiceDep, check_request

router = APIRouter()


@router.post("/v1/chat/completions", dependencies=[Depends(authorized)])
async def chat_completions(body: ChatRequest, http: Request, svc: ServiceDep):
    check_request(svc, body)
    conversation = body.conversation()
    try:
        ids = encode_messages(svc.pair, conversation)
    except InputError as error:
        raise ApiError(400, str(error), param="messages") from None
    return await respond(svc, http, body, ids, chat=True)
