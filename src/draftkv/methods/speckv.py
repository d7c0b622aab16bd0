"""SpecKV: the draft's guess of the answer tells which prompt KV entries the answer will need.

1. The draft reads the prompt and greedily generates `lookahead` tokens (its own cache is
   discarded). Default: the request's max_new_tokens, capped by `max_lookahead`.
2. The target prefills the prompt, then the lookahead tokens as a probe; the window queries
   are the last `window` prompt tokens and every lookahead token.
3. Per layer and KV head, keep the top `budget - window` prefix entries by pooled score plus
   the window. The probe's own entries are dropped: they were only a probe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from .base import PseudoAnswer, WindowKVMethod, check_bool, check_choice, check_int, param


@dataclass(frozen=True)
class SpecKV(WindowKVMethod):
    name: ClassVar[str] = "speckv"
    summary: ClassVar[str] = "KV dropping by the attention of the draft's lookahead answer (plus the window)."

    lookahead: int | None = param(None, "draft lookahead tokens; None = the request's max_new_tokens, capped by max_lookahead")
    max_lookahead: int = param(128, "cap on the default lookahead length")
    guesser: str = param("draft", "who writes the lookahead answer: draft (SpecKV), or target: the target's own "
                                  "answer from its full cache, an oracle for analysis that costs a dense decode")
    verify_lookahead: bool = param(True, "the target checks the guess it reads: the guessed tokens it agrees with "
                                         "(and its own next token) start the answer, from its full cache; false: "
                                         "the paper's method, which decodes every answer token over the compressed "
                                         "cache")

    verify_rounds: int = param(0, "with verify_lookahead: where the target's check stops, its own token corrects the "
                                  "guess and the draft guesses the rest again from there, checked again, at most "
                                  "this many times (0: one check)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("verify_rounds", self.verify_rounds, 0)
        if self.verify_rounds and not self.verify_lookahead:
            raise ConfigError("verify_rounds corrects the guess where the target's check stops; it needs "
                              "verify_lookahead=true")
        if self.lookahead is not None and (isinstance(self.lookahead, bool) or not isinstance(self.lookahead, int)
                                           or self.lookahead < 1):
            raise ConfigError(f"lookahead must be an int >= 1 or None, got {self.lookahead!r}")
        if isinstance(self.max_lookahead, bool) or not isinstance(self.max_lookahead, int) or self.max_lookahead < 1:
            raise ConfigError(f"max_lookahead must be an int >= 1, got {self.max_lookahead!r}")
        check_choice("guesser", self.guesser, ("draft", "target"))
        check_bool("verify_lookahead", self.verify_lookahead)

    def lookahead_tokens(self, max_new_tokens: int) -> int:
        return self.lookahead if self.lookahead is not None else min(max_new_tokens, self.max_lookahead)

    def draft_lookahead(self, max_new_tokens: int) -> int:
        return self.lookahead_tokens(max_new_tokens) if self.guesser == "draft" else 0

    def guess(self, max_new_tokens: int) -> PseudoAnswer | None:
        return PseudoAnswer(self.lookahead_tokens(max_new_tokens)) if self.guesser == "target" else None


@dataclass(frozen=True)
class AdaSpecKV(SpecKV):
    name: ClassVar[str] = "ada-speckv"
    summary: ClassVar[str] = "SpecKV with Ada-KV's adaptive per-head budgets (ragged cache)."

    allocation: str = param("ada", "how the budget is spread over layers and KV heads (Ada-KV's: ada)")
