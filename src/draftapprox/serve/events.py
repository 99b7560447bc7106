"""What a backend's answer is made of: text as it comes, then either the end with its usage and record, or a
failure with the HTTP status it maps to."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Delta:
    """New text of the answer."""

    text: str


@dataclass
class Finished:
    """The answer ended: `rest` is its text not yet sent as deltas, `text` the whole of it (stop strings cut)."""

    text: str
    rest: str
    finish_reason: str  # "stop" or "length", as the OpenAI API says it
    usage: dict
    extension: dict  # the `draftapprox` object


@dataclass
class Failed:
    """The answer ended with an error; `status` is the HTTP status it maps to."""

    status: int
    message: str
    type: str = "server_error"
