"""The OpenAI API subset the server speaks: request validation (pydantic) and response bodies.

Shapes follow the OpenAI API reference for `/v1/chat/completions`, `/v1/completions` and `/v1/models`,
and its error object `{"error": {"message", "type", "param", "code"}}`. Requests are validated strictly
(no "5" for 5); fields this server does not know are ignored, as other OpenAI-compatible servers do, but
known features it does not implement (n > 1, logprobs, tools, penalties) are refused rather than ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, ValidationError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
INT64_MIN, UINT64_MAX = -(2 ** 63), 2 ** 64 - 1  # the seeds torch.Generator.manual_seed takes


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body with `status`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _prompt(value):
    """A string, a one-string array, or an array of token ids."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and value and all(type(v) is int for v in value):
        return value
    if isinstance(value, list) and len(value) > 1 and all(isinstance(v, str) for v in value):
        raise ValueError("only one prompt per request is supported")
    raise ValueError("must be a string or a non-empty array of token ids")


def _content(value):
    """A string, or an array of text parts ({"type": "text", "text": ...}) joined into one string."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                       and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise ValueError("must be a string or an array of text parts ({\"type\": \"text\", \"text\": ...})")


def _stop(value):
    return [value] if isinstance(value, str) else value


StopStrings = Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]],
                        BeforeValidator(_stop), Field(max_length=MAX_STOP_STRINGS)]


# strict: no "5" for 5; NaN and Infinity (which the JSON parser accepts) are refused too
STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by both completion endpoints."""

    model_config = STRICT
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)
    top_k: int = Field(0, ge=-1)  # an extension (as in vLLM); -1 or 0: off
    seed: int | None = Field(None, ge=INT64_MIN, le=UINT64_MAX)
    stop: StopStrings | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) for the first feature asked for that this server does not implement."""
        if self.n != 1:
            return "n", f"n={self.n}: this server returns one choice per request"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f"{name} is not supported (only 0)"
        return None


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: Annotated[str, PlainValidator(_content)]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    logprobs: bool | None = None
    tools: list | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs:
            return "logprobs", "logprobs are not supported"
        if self.tools:
            return "tools", "tool calling is not supported"
        return super().unsupported()


class CompletionRequest(_Sampling):
    prompt: Annotated[str | list[int], PlainValidator(_prompt)]
    max_tokens: int | None = Field(16, ge=1)  # the OpenAI default for this endpoint
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.logprobs is not None:
            return "logprobs", "logprobs are not supported"
        if self.echo:
            return "echo", "echo is not supported"
        if self.suffix:
            return "suffix", "suffix (insertion) is not supported"
        return super().unsupported()


def parse(model: type[_Sampling], body: bytes):
    """Validate a JSON body into `model`, or raise a 400 `APIError` naming the first bad field."""
    try:
        request = model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        if first["type"] == "json_invalid":
            raise APIError(400, f"the request body is not valid JSON ({first['msg']})",
                           code="invalid_json") from None
        loc = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "missing":
            message = "this field is required"
        text = f"{loc}: {message}" if loc else f"the request body: {message}"
        if len(errors) > 1:
            text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        raise APIError(400, text, param=str(first["loc"][0]) if first["loc"] else None,
                       code="invalid_value") from None
    refused = request.unsupported()
    if refused:
        raise APIError(400, refused[1], param=refused[0], code="unsupported_parameter")
    return request


# -- responses ------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_completion(id: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def chat_chunk(id: str, model: str, delta: dict, finish_reason: str | None = None) -> dict:
    return {"id": id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def text_completion(id: str, model: str, text: str, finish_reason: str | None, usage_: dict | None) -> dict:
    """A `/v1/completions` body; also each streamed chunk (with `usage_` None and no finish until the last)."""
    body = {"id": id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def usage_chunk(id: str, model: str, object: str, usage_: dict) -> dict:
    """The extra last chunk of a stream asked for with `stream_options.include_usage`."""
    return {"id": id, "object": object, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "powerinfer"}
