"""Allocations: how a KV method spreads its budget over layers and KV heads. A KV method is a scorer
(what matters), an allocation (how much each layer and head keeps) and protection (the sinks and the
last window, kept whatever the scores). Each allocation is one small file here."""

from __future__ import annotations

from ...errors import ConfigError
from .ada import Ada
from .base import Allocation, best_positions
from .global_threshold import Global
from .pyramid import Pyramid
from .uniform import Uniform

ALLOCATIONS: dict[str, type[Allocation]] = {cls.name: cls for cls in (Uniform, Pyramid, Ada, Global)}


def check_allocation(name: str) -> None:
    if name not in ALLOCATIONS:
        raise ConfigError(f"allocation must be one of {', '.join(ALLOCATIONS)}; got {name!r}")


def get_allocation(name: str, *, alpha: float, beta: float) -> Allocation:
    """The allocation `name` with the parameters it reads (ada: alpha; pyramid: beta)."""
    check_allocation(name)
    if name == "ada":
        return Ada(alpha)
    if name == "pyramid":
        return Pyramid(beta)
    return ALLOCATIONS[name]()


__all__ = ["ALLOCATIONS", "Ada", "Allocation", "Global", "Pyramid", "Uniform", "best_positions", "check_allocation",
           "get_allocation"]
