"""One request as a backend receives it, after validation: token ids, the method, sampling, and the client's
connection (so that a backend can notice a client that went away)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import torch
from fastapi import Request

from ..generation import Sampling
from ..methods import Method


@dataclass
class Work:
    ids: torch.Tensor  # (1, n): the whole prompt, chat template applied
    method: Method
    max_tokens: int
    sampling: Sampling
    stop: list[str]
    ignore_eos: bool
    http: Request | None
    timeout: float | None = None
    speculative: int | str = 0


class Disconnected(Exception):
    """The client went away while its request waited."""


async def poll(queue: asyncio.Queue, http: Request | None, every: float = 0.25):
    """The next item of `queue`; raises `Disconnected` if the client hangs up meanwhile (a non-streaming request:
    a stream's disconnect cancels its task instead)."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=every)
        except asyncio.TimeoutError:
            if http is not None and await http.is_disconnected():
                raise Disconnected from None
