"""The pair's and the request's plain options and their checks: strings and numbers only, so the command
line can check them before torch or a model loads."""

from __future__ import annotations

from .errors import ConfigError

DECODE_BACKENDS = ("auto", "eager", "static")
DRAFT_CACHES = ("compressed", "whole", "window")
# auto: the fastest the device measures (models.dtypes); the others as named.
DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


def check_backend(backend: str) -> str:
    if backend not in DECODE_BACKENDS:
        raise ConfigError(f"decode backend {backend!r} is not one of {', '.join(DECODE_BACKENDS)}")
    return backend


def check_dtype(dtype: str | None) -> str:
    """A dtype as written on a command line or in settings (None: auto)."""
    name = "auto" if dtype is None else str(dtype).strip().lower()
    if name not in DTYPE_NAMES:
        raise ConfigError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_NAMES)}")
    return name


def check_draft_cache(draft_cache: str) -> str:
    if draft_cache not in DRAFT_CACHES:
        raise ConfigError(f"draft_cache must be one of {', '.join(DRAFT_CACHES)}, got {draft_cache!r}")
    return draft_cache


def check_speculate(speculate: int | str) -> int | str:
    if speculate == "auto":
        return speculate
    if isinstance(speculate, bool) or not isinstance(speculate, int) or not 0 <= speculate <= 64:
        raise ConfigError(f"speculate must be a whole number of draft tokens per target call from 0 (off) to 64, "
                          f"or 'auto', got {speculate!r}")
    return speculate


def parse_speculate(text: str) -> int | str:
    """A speculate value as written on a command line or in model args: 'auto' or a whole number."""
    text = str(text).strip()
    try:
        return check_speculate("auto" if text == "auto" else int(text))
    except ValueError:
        raise ConfigError(f"speculate must be a whole number of draft tokens per target call from 0 (off) to 64, "
                          f"or 'auto', got {text!r}") from None
