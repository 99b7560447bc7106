"""The OpenAI API's request bodies as pydantic models, the `draftapprox` extension field, and the error body.

Bodies are validated strictly: an unknown field is refused rather than ignored, and a field the API defines but we
do not implement (several choices, log-probabilities, tools, penalties) is refused with a message naming it unless
it is at its neutral value, so a client never gets an answer to a question it did not ask.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
)


class ApiError(Exception):
    """An error answered with an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.param, self.code, self.headers = status, type, param, code, headers

    def body(self) -> dict:
        return error_body(str(self), self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class Options(BaseModel):
    """The `draftapprox` field: the method for this request (default: the server's), its budget and knobs."""

    model_config = ConfigDict(extra="forbid")
    method: StrictStr | None = None
    budget: StrictInt | StrictFloat | None = None
    settings: dict[str, StrictStr | StrictInt | StrictFloat | StrictBool] = Field(default_factory=dict)
    # draft tokens proposed per decode step, "auto", 0: off; any JSON value, so that a wrong one gets our message
    speculative: Any = None


def with_specprefill(options: Options | None, specprefill: bool | None, keep_pct: float | None,
                     off: str) -> Options | None:
    """vllm-mlx's SpecPrefill request fields as our `draftapprox` options, so that its clients work unchanged:
    `specprefill: true` (with `specprefill_keep_pct`, the share kept) is our `specprefill` method, `false` is `off`
    (no compression). Unlike vllm-mlx, where the server's settings decide whether SpecPrefill runs at all, a
    `specprefill_keep_pct` alone turns it on here (a client that sends a share wants it applied), and no length
    threshold applies but the proxy's `--min-prompt-tokens`. Mixing them with `draftapprox.method` or
    `draftapprox.budget`, or a share outside (0, 1], is a 400 naming the field."""
    if specprefill is None and keep_pct is None:
        return options
    field = "specprefill" if specprefill is not None else "specprefill_keep_pct"
    if options is not None and (options.method is not None or options.budget is not None):
        raise ApiError(400, f"{field} (vllm-mlx's field) and draftapprox.method/budget both choose the method: "
                            "give one of them", param=field)
    if specprefill is False:
        if keep_pct is not None:
            raise ApiError(400, "specprefill_keep_pct is given with specprefill=false", param="specprefill_keep_pct")
        return Options(method=off, settings=options.settings if options else {},
                       speculative=options.speculative if options else None)
    if keep_pct is not None and (isinstance(keep_pct, bool) or not 0 < keep_pct <= 1):
        raise ApiError(400, f"specprefill_keep_pct must be a share in (0, 1], got {keep_pct!r}",
                       param="specprefill_keep_pct")
    return Options(method="specprefill", budget=float(keep_pct) if keep_pct is not None else None,
                   settings=options.settings if options else {},
                   speculative=options.speculative if options else None)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


# Fields of the OpenAI API we accept only at their neutral value, with what to say otherwise.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "n": (1, "n > 1 (several choices) is not supported"),
    "best_of": (1, "best_of is not supported"),
    "logprobs": (None, "logprobs are not supported"),
    "top_logprobs": (None, "top_logprobs are not supported"),
    "echo": (False, "echo is not supported"),
    "suffix": (None, "suffix (insertion) is not supported"),
    "presence_penalty": (0, "presence_penalty is not supported"),
    "frequency_penalty": (0, "frequency_penalty is not supported"),
    "logit_bias": (None, "logit_bias is not supported"),
    "tools": (None, "tools are not supported"),
    "tool_choice": (None, "tool_choice is not supported"),
    "functions": (None, "functions are not supported"),
    "function_call": (None, "function_call is not supported"),
    "parallel_tool_calls": (None, "parallel_tool_calls is not supported"),
    "response_format": (None, "response_format is not supported"),
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = None
    top_p: StrictFloat | StrictInt | None = None
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None
    draftapprox: Options | None = None
    specprefill: StrictBool | None = None  # vllm-mlx's SpecPrefill fields (`with_specprefill`)
    specprefill_keep_pct: StrictFloat | StrictInt | None = None
    ignore_eos: StrictBool = False  # vLLM's extension: decode exactly max_tokens (benchmarks)
    # accepted only at their neutral values (see UNSUPPORTED)
    n: Any = None
    best_of: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None
    response_format: Any = None

    @field_validator("max_tokens", "max_completion_tokens", check_fields=False)  # the second is chat's alone
    @classmethod
    def _positive(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"{info.field_name} must be >= 1")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and not 0 <= value <= 2:
            raise ValueError("temperature must be in [0, 2]")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError("top_p must be in (0, 1]")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        items = [] if value is None else [value] if isinstance(value, str) else value
        if len(items) > 4:
            raise ValueError("at most 4 stop strings")
        if any(not s for s in items):
            raise ValueError("a stop string must not be empty")
        return items

    def refuse_unsupported(self) -> None:
        """Raise an `ApiError` for the first field set to something we do not implement."""
        for name, (neutral, message) in UNSUPPORTED.items():
            value = getattr(self, name, None)
            if value is None or value == neutral or (neutral is None and value is False):
                continue
            if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
                continue
            raise ApiError(400, message, param=name, code="unsupported")


class CompletionRequest(_Request):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    suffix: Any = None

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request: a text or token ids (a batch of one is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ApiError(400, "one prompt per request: a batch of prompts is not supported", param="prompt",
                               code="unsupported")
            prompt = prompt[0]
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise ApiError(400, "the prompt is empty", param="prompt")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]
    name: StrictStr | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: StrictInt | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template takes them (`developer` is the newer name of `system`)."""
        if all(not m.text().strip() for m in self.messages):
            raise ApiError(400, "the messages are empty", param="messages")
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]
