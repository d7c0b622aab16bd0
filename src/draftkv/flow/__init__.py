"""The one request flow as a small package: plan -> steps -> select -> execute -> results."""

from .execute import prepare, prepare_each, run, run_each
from .results import Prepared, finish
from .steps import Observer, StageEvent

__all__ = ["Observer", "Prepared", "StageEvent", "finish", "prepare", "prepare_each", "run", "run_each"]
