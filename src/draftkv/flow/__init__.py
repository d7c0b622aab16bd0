"""The one request flow as a small package: plan -> steps -> select -> execute -> results."""

from .execute import prepare, prepare_each, run, run_each
from .plan import Consumer, LayerKinds
from .results import Prepared, answer_spec, finish, finish_together, guessed, row_stats
from .steps import Observer, StageEvent, check_fits, check_probes, eos_ids

__all__ = ["Consumer", "LayerKinds", "Observer", "Prepared", "StageEvent", "answer_spec", "check_fits", "check_probes", "eos_ids", "finish",
           "finish_together", "guessed", "prepare", "prepare_each", "row_stats", "run", "run_each"]
