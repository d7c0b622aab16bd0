"""The methods registry: a method is a small validated config, looked up by name."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..errors import ConfigError, UnknownMethodError
from .base import Budget, Method, WindowKVMethod, help_of
from .dense import Dense
from .snapkv import SnapKV
from .speckv import SpecKV

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Dense, SnapKV, SpecKV)}


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
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"method {method_class.name!r} has no parameter {', '.join(map(repr, unknown))}; "
            f"its parameters are: {', '.join(allowed) or 'none'}"
        )
    return method_class(**{**given, **params})

__all__ = ["METHODS", "Budget", "Dense", "Method", "SnapKV", "SpecKV", "WindowKVMethod", "get_method", "help_of"]
