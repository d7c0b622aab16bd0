"""The OpenAI request and response shapes the server speaks, and its error shape.

Requests are validated here, so a bad one is answered with a 4xx and a message that names the field,
before any work is queued. Fields that are not OpenAI's are draftkv's: `method`, `budget`,
`prompt_budget`, `compression_ratio` (kvpress's name: the share removed, 1 - budget) and any parameter
of the chosen method (`window`, `kernel`, ...).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..types import SEEDS

log = logging.getLogger("draftkv.serve")

# OpenAI fields that change nothing here and are accepted as they are.
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier",
           "prompt_cache_key", "modalities", "reasoning_effort", "verbosity"}
# OpenAI features that are not supported: accepted only at their neutral value.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logit_bias": (None, {}),
    "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"), "best_of": (None, 1),
    "suffix": (None, ""), "response_format": (None, {"type": "text"}),
}
DRAFTKV_FIELDS = {"method", "budget", "prompt_budget", "compression_ratio", "inspect"}
MAX_DEPTH = 32  # nesting of objects and lists in a request body (OpenAI's requests need 5)
MAX_DIGITS = 40  # digits of an integer in a request body (a seed takes 20)


class ServeError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 404: "not_found_error", 408: "timeout_error",
             429: "rate_limit_error", 502: "upstream_error", 503: "overloaded_error", 504: "timeout_error"}

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        """The error's JSON; text it echoes from the request (a key holding a lone surrogate) is escaped,
        so the answer itself is always valid UTF-8."""
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": escaped(self.message), "type": kind,
                          "param": escaped(self.param) if self.param is not None else None, "code": self.code}}

    @classmethod
    def internal(cls, request_id: str, error: BaseException) -> ServeError:
        """A failure of the server's own code while answering a request: 500 with the request id, the
        traceback in the log."""
        log.error("request %s failed", request_id, exc_info=error)
        return cls(500, f"internal error in request {request_id}: {type(error).__name__}: {str(error)[:200]} "
                   "(the server's log has the details)", code="internal")


# Strict types: JSON true is not the number 1, and "yes" is not true.
STRICT = ConfigDict(extra="allow", strict=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class Common(BaseModel):
    """The fields chat and completion requests share."""

    model_config = STRICT

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=SEEDS[0], le=SEEDS[1])
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    method: str | None = None
    budget: int | float | None = Field(None, gt=0)
    prompt_budget: int | float | None = Field(None, gt=0)
    compression_ratio: float | None = Field(None, ge=0, lt=1)  # kvpress's: the share removed
    # Draft proposals per target call while decoding, or "auto".
    speculate: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] | None = None
    # Return, in the draftkv block, what the method kept of each prompt token (for `draftkv.Inspection`).
    inspect: bool = False

    def method_params(self) -> dict[str, Any]:
        """The chosen method's own parameters: every field that is neither OpenAI's nor a budget."""
        extra = dict(self.model_extra or {})
        for name in list(extra):
            if name in IGNORED:
                extra.pop(name)
            elif name in NEUTRAL:
                value = extra.pop(name)
                if value not in NEUTRAL[name]:
                    raise ServeError(400, f"{name}={json.dumps(value)} is not supported by draftkv; leave it out",
                                     param=name, code="unsupported_parameter")
        return extra

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class Message(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ServeError(400, f"message content parts must be text parts ({{'type': 'text', 'text': ...}}), "
                                 f"got type {part.get('type')!r}", param="messages", code="unsupported_content")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def chat(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def wanted_logprobs(self) -> int | None:
        """How many likeliest tokens each reported token lists (None: no log-probabilities)."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ServeError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False

    def one(self) -> str | list[int]:
        """The request's one prompt: text, or token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        if self.prompt and all(isinstance(token, int) for token in self.prompt):
            return list(self.prompt)
        if len(self.prompt) != 1:
            raise ServeError(400, f"give one prompt per request (got a list of {len(self.prompt)})", param="prompt")
        if isinstance(self.prompt[0], list) and not self.prompt[0]:
            raise ServeError(400, "the prompt holds no token ids", param="prompt", code="invalid_prompt")
        return self.prompt[0]

    def wanted_logprobs(self) -> int | None:
        return self.logprobs


def parse(model: type[Common], raw: bytes) -> tuple[Common, dict]:
    """A request from its JSON body (and the body as read), or a ServeError that says what is wrong."""
    try:
        body = json.loads(raw, parse_int=whole_number, parse_constant=not_json)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ServeError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:
        raise ServeError(400, f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json") \
            from None
    if not isinstance(body, dict):
        raise ServeError(400, "the request body must be a JSON object", code="invalid_json")
    check_values(body)
    try:
        request = model.model_validate(body)
    except ValidationError as error:
        first = error.errors()[0]
        where = field_path(first["loc"])
        missing = first["type"] == "missing"
        raise ServeError(400, f"{where}: {'field required' if missing else first['msg']}",
                         param=where, code="missing_field" if missing else "invalid_value") from None
    if request.n != 1:
        raise ServeError(400, "n must be 1: draftkv returns one choice per request", param="n",
                         code="unsupported_parameter")
    return request, body


def check_values(body: dict) -> None:
    """No deeper than MAX_DEPTH, and every string valid Unicode: a lone surrogate ("\\ud800") is JSON
    but no text, and would fail deep inside the tokenizer."""
    stack: list[tuple[Any, str, int]] = [(body, "", 1)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_DEPTH:
                raise ServeError(400, f"the request body is nested more than {MAX_DEPTH} levels deep (at "
                                 f"{path or 'the top'})", param=path or None, code="invalid_json")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                where = f"{path}[{key}]" if isinstance(key, int) else f"{path}.{key}" if path else str(key)
                if isinstance(key, str):
                    check_unicode(key, where)
                stack.append((item, where, depth + 1))
        elif isinstance(value, str):
            check_unicode(value, path)


def escaped(text: str) -> str:
    """`text` with anything that is not a character (a lone surrogate) written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def whole_number(digits: str) -> int:
    """A JSON integer, refused before Python parses it when it has more digits than any field takes (a
    seed needs 20): a number of thousands of digits would take Python's integer parser past its limit."""
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise ServeError(400, f"the request body holds an integer of {len(digits.lstrip('-')):,} digits; no field "
                         f"takes more than {MAX_DIGITS}", code="invalid_value")
    return int(digits)


def not_json(constant: str) -> float:
    raise ServeError(400, f"the request body holds {constant}, which is not JSON (numbers are finite)",
                     code="invalid_json")


def check_unicode(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ServeError(400, f"{where} holds {text[error.start]!r} at character {error.start}, a lone surrogate "
                         "that is not a character; send valid Unicode text", param=where,
                         code="invalid_value") from None


def field_path(location: tuple) -> str:
    """The field as the user wrote it ("messages[0].role", "budget"), without pydantic's type tags
    ("budget.int", "stop.list[str]")."""
    names = {name for model in (ChatRequest, CompletionRequest, Message, StreamOptions) for name in model.model_fields}
    path = ""
    for part in location:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in names:
            path += f".{part}" if path else part
    return path or ".".join(map(str, location))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"
