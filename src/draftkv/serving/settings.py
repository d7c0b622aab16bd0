"""The server's settings (flags or DRAFTKV_* environment variables of `draftkv serve`): checked when
made, before any model loads, and importable without the server's stack or torch."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..errors import ConfigError
from ..types import is_int, is_number


@dataclass
class ServeSettings:
    """Server-wide defaults and limits (flags or DRAFTKV_* environment variables of `draftkv serve`),
    checked when made, so a bad value is refused before any model loads."""

    method: str = "dense"  # the method of requests that name none
    params: dict[str, Any] = field(default_factory=dict)  # its default parameters (budget, prompt_budget, ...)
    model_name: str | None = None  # the model name clients use (default: the target's, or the upstream model)
    upstream: str | None = None  # proxy mode: the upstream engine's base URL (".../v1")
    upstream_model: str | None = None
    upstream_api_key: str | None = None
    upstream_timeout: float = 600.0
    api_key: str | None = None  # every route but /health then needs "Authorization: Bearer <api_key>"
    allow_origins: tuple[str, ...] = ()  # web pages (origins) that may call the server from a browser (CORS)
    max_batch_size: int = 8
    max_queue: int = 256
    max_prompt_tokens: int | None = None
    max_tokens: int | None = None  # for requests that give no max_tokens (None: 256, or max_tokens_limit if lower)
    max_tokens_limit: int | None = None  # the most new tokens a request may ask for (default: the context's room)
    max_guess_tokens: int = 512  # the longest guess a method may ask for (draft lookahead, LAQ++'s pseudo-answer)
    max_probes: int = 64  # the most probes a method may read the prompt back in (KVzip: one per chunk)
    max_logprobs: int = 20  # the most likeliest tokens listed per token
    max_body_bytes: int = 32 * 2**20  # the largest request body
    temperature: float = 0.0  # for requests that give none (0: greedy, reproducible)
    timeout: float = 600.0  # seconds a request may take, queueing included
    memory_limit: int | None = None  # bytes running requests may use (default: 90% of free memory)

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_queue", "max_guess_tokens", "max_probes", "max_body_bytes"):
            check_setting(name, getattr(self, name), "a whole number >= 1", lambda v: is_int(v) and v >= 1)
        for name in ("max_prompt_tokens", "max_tokens", "max_tokens_limit", "memory_limit"):
            check_setting(name, getattr(self, name), "a whole number >= 1, or unset",
                          lambda v: v is None or (is_int(v) and v >= 1))
        check_setting("max_logprobs", self.max_logprobs, "a whole number from 0 to 20",
                      lambda v: is_int(v) and 0 <= v <= 20)
        for name in ("timeout", "upstream_timeout"):
            check_setting(name, getattr(self, name), "a number of seconds > 0",
                          lambda v: is_number(v) and math.isfinite(v) and v > 0)
        check_setting("temperature", self.temperature, "a number from 0 to 2", lambda v: is_number(v) and 0 <= v <= 2)
        if None not in (self.max_tokens, self.max_tokens_limit) and self.max_tokens > self.max_tokens_limit:
            raise ConfigError(f"--max-tokens ({self.max_tokens}) is more than --max-tokens-limit "
                              f"({self.max_tokens_limit}): a request that names no max_tokens could not run")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("--api-key is empty; give a key, or leave it out to serve without one")
        if self.upstream is not None:
            check_upstream(self.upstream)
        self.allow_origins = tuple(self.allow_origins)
        for origin in self.allow_origins:
            check_origin(origin)

    @property
    def proxy(self) -> bool:
        return self.upstream is not None

    @property
    def default_max_tokens(self) -> int:
        """New tokens for a request that names none."""
        return self.max_tokens or min(256, self.max_tokens_limit or 256)


def check_setting(name: str, value: object, allowed: str, ok) -> None:
    if not ok(value):
        raise ConfigError(f"--{name.replace('_', '-')} must be {allowed}, got {value!r}")


def check_origin(origin: str) -> None:
    """An origin a browser sends: scheme://host[:port] with no path, or * for every page."""
    if origin == "*":
        return
    try:
        parsed = httpx.URL(origin)
    except (httpx.InvalidURL, TypeError):
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host or parsed.path not in ("", "/") \
            or parsed.query or parsed.fragment or origin.endswith("/"):
        raise ConfigError(f"--allow-origin {origin!r} is not an origin; give one like https://app.example.com or "
                          "http://localhost:3000 (scheme, host and port, no path), or * for every page")


def check_upstream(url: str) -> None:
    """An upstream is an http(s) URL with a host, like http://gpu-box:8001/v1."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError) as error:
        raise ConfigError(f"--upstream {url!r} is not a URL ({error}); give one like http://gpu-box:8001/v1") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"--upstream {url!r} is not an http(s) URL with a host; give one like "
                          "http://gpu-box:8001/v1")
