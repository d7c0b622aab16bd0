"""The methods registry: a method is a small validated config, looked up by name."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..errors import ConfigError, UnknownMethodError
from .base import (
    Budget,
    KVMethod,
    Method,
    PromptMethod,
    PseudoAnswer,
    WindowKVMethod,
    help_of,
)
from .dense import Dense
from .h2o import H2O
from .keydiff import KeyDiff
from .kvzip import KVzip
from .laq import LAQ
from .lingua import Lingua
from .pyramidkv import PyramidKV
from .scorers import DraftAttention, DraftScorer, KVScorer, SelfInformation, TargetReading, WindowScorer
from .snapkv import AdaSnapKV, SnapKV
from .speckv import AdaSpecKV, SpecKV
from .speckv_pc import SpecKVPC
from .specpc import SpecPC
from .specprefill import SpecPrefill
from .streamingllm import StreamingLLM
from .truncation import KeepEnds, KeepLast

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (Dense, StreamingLLM, H2O, SnapKV, PyramidKV, SpecKV, AdaSnapKV, AdaSpecKV, LAQ, SpecPC,
                              SpecKVPC, SpecPrefill, Lingua, KeepLast, KeepEnds, KVzip, KeyDiff)
}


def get_method(method: str | Method, **params: Any) -> Method:
    """A method instance from its name and parameters, or a method with some parameters replaced."""
    if isinstance(method, Method):
        method_class, given = type(method), method.params()
    else:
        method_class = METHODS.get(str(method).lower())
        if method_class is None:
            raise UnknownMethodError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
        given = {}
    allowed = [f.name for f in dataclasses.fields(method_class)]
    if "compression_ratio" in params:
        params = compression_as_budget(method_class.name, allowed, params)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method {method_class.name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(allowed) or 'none'}"
        )
    return method_class(**{**given, **params})


def compression_as_budget(name: str, allowed: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """kvpress's `compression_ratio` (the share removed) as this project's `budget` (the share kept)."""
    params = dict(params)
    ratio = params.pop("compression_ratio")
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio < 1:
        raise ConfigError(f"compression_ratio must be a number in [0, 1) (the share removed, as in kvpress), "
                          f"got {ratio!r}")
    if "budget" not in allowed:
        raise ConfigError(f"method {name!r} compresses nothing, so it takes no compression_ratio")
    if params.get("budget") is not None:
        raise ConfigError("give budget (the share or number kept) or compression_ratio (the share removed), not both")
    return {**params, "budget": 1.0 - float(ratio)}


def names(stage: str = "any") -> list[str]:
    """The registered methods that fill `stage`: "prompt" (station 1), "kv" (station 2), "prompt only"
    (station 1 and not station 2: they need no target cache of their own) or "any"."""
    chosen = {name: get_method(name) for name in METHODS}
    fills = {"any": lambda m: True, "prompt": lambda m: m.compresses_prompt, "kv": lambda m: m.compresses_kv,
             "prompt only": lambda m: m.compresses_prompt and not m.compresses_kv}
    return [name for name, method in chosen.items() if fills[stage](method)]


def budget_kinds(method: str) -> tuple[bool, bool]:
    """Whether `method` takes a KV budget and whether it takes a prompt budget (speckv-pc: both)."""
    chosen = get_method(method)
    return chosen.compresses_kv, chosen.compresses_prompt


def budget_params(method: str, budget: Budget | None = None, prompt_budget: Budget | None = None) -> dict[str, Budget]:
    """The method's parameters for the two budgets users speak of: `budget` (KV entries; a prompt method's
    only budget) and `prompt_budget` (prompt tokens: a prompt method's budget, speckv-pc's prompt stage).
    The one place that says which budget goes to which parameter."""
    takes_kv, takes_prompt = budget_kinds(method)
    params: dict[str, Budget] = {}
    if prompt_budget is not None:
        if not takes_prompt:
            raise ConfigError(f"method {method!r} keeps no prompt tokens, so it takes no prompt_budget; "
                              f"prompt methods: {', '.join(names('prompt'))}")
        if not takes_kv and budget is not None:
            raise ConfigError(f"method {method!r} has one budget (prompt tokens): give budget or prompt_budget, "
                              "not both")
        params["prompt_budget" if takes_kv else "budget"] = prompt_budget
    if budget is not None:
        params["budget"] = budget
    return params


def budget_settings(method: str, budgets: list[Budget], prompt_budgets: list[Budget],
                    ) -> list[tuple[Budget | None, Budget | None]]:
    """Each (KV budget, prompt budget) a sweep runs `method` at: every KV budget for a KV method, every prompt
    budget for a prompt method, each KV budget within each prompt budget for both (speckv-pc), one run
    (None, None) for a method with no budget. The one place a sweep's budgets are routed to a method."""
    takes_kv, takes_prompt = budget_kinds(method)
    if takes_kv and takes_prompt:  # a ratio's count varies with the prompt, so only counts are compared
        return [(b, p) for p in prompt_budgets for b in budgets
                if isinstance(b, float) or isinstance(p, float) or b <= p]
    if takes_kv:
        return [(b, None) for b in budgets]
    if takes_prompt:
        return [(None, p) for p in prompt_budgets]
    return [(None, None)]


def method_spec(text: str) -> tuple[str, dict[str, Any]]:
    """A method as a sweep names it: `name`, or `name:key=value:key=value` with its other parameters (values
    read as JSON where they are JSON: true, 64, 0.5; text otherwise). The method is checked now."""
    name, *given = text.strip().split(":")
    params: dict[str, Any] = {}
    for item in given:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{text!r}: write a method's parameters as name:key=value:key=value, "
                              f"e.g. speckv:verify_lookahead=false")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    get_method(name, **params)
    return name, params


def method_with_budgets(method: str, budget: Budget | None = None, prompt_budget: Budget | None = None,
                        **params: Any) -> Method:
    """A method from the two budgets users speak of (see budget_params) and its other parameters."""
    return get_method(method, **{**params, **budget_params(method, budget, prompt_budget)})


__all__ = [
    "AdaSnapKV", "AdaSpecKV", "H2O", "KVMethod", "KVzip", "KeyDiff", "LAQ", "PyramidKV", "METHODS", "StreamingLLM", "Budget", "Dense", "DraftAttention", "DraftScorer", "KVScorer", "SelfInformation", "TargetReading", "WindowScorer", "KeepEnds", "KeepLast", "Lingua", "Method", "PromptMethod",
    "PseudoAnswer", "SnapKV",
    "SpecKV", "SpecKVPC", "SpecPC", "SpecPrefill", "WindowKVMethod", "budget_kinds", "budget_params", "budget_settings", "names", "get_method", "help_of", "method_spec", "method_with_budgets",
]
