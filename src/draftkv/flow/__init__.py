"""The one request flow as a small package: plan -> steps -> select -> execute -> results."""

from .execute import prepare, prepare_each, run, run_each
from .results import Prepared, finish, finish_together
from .steps import Observer, StageEvent

__all__ = ["Observer", "Prepared", "StageEvent", "finish", "finish_together", "prepare", "prepare_each", "run", "run_each"]
