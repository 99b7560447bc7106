"""`POST /tokenize` (vLLM's body): a text's token ids under the served tokenizer, so that a proxy in front of this
server can check that its draft tokenizes the same way."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from ..auth import authorized
from .common import ServiceDep

router = APIRouter()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


@router.post("/tokenize", dependencies=[Depends(authorized)])
async def tokenize(body: TokenizeRequest, svc: ServiceDep) -> dict:
    tokens = svc.pair.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return {"tokens": tokens, "count": len(tokens), "max_model_len": svc.context}
