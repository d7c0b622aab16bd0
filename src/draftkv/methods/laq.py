"""LAQ++ (lookahead Q-cache): the target's own pseudo-answer scores the full cache.

Stage 1 compresses a copy of the cache with SnapKV; the target then generates `pseudo_tokens`
tokens from that copy. Their queries, with the last `window` prompt queries, score the full cache,
which is compressed again to `budget`. It needs the full target cache during selection (no
peak-memory saving) and the target's own decoding steps: SpecKV replaces both with the draft.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import PseudoAnswer, WindowKVMethod, check_bool, check_int, param
from .snapkv import SnapKV


@dataclass(frozen=True)
class LAQ(WindowKVMethod):
    name: ClassVar[str] = "laq"
    summary: ClassVar[str] = "KV dropping scored by the target's own pseudo-answer, made on a SnapKV-compressed copy."

    window: int = param(8, "last prompt tokens always kept; their queries score with the pseudo-answer")
    pseudo_tokens: int = param(8, "tokens the target generates from the stage-one cache")
    stage_one_window: int = param(32, "SnapKV window of stage one")
    verify_lookahead: bool = param(True, "the target checks the guess it reads: the guessed tokens it agrees with "
                                         "(and its own next token) start the answer, from its full cache; false: "
                                         "the paper's method, which decodes every answer token over the compressed "
                                         "cache")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("pseudo_tokens", self.pseudo_tokens, 1)
        check_bool("verify_lookahead", self.verify_lookahead)
        self.guess(1)  # validates the stage-one SnapKV now

    def guess(self, max_new_tokens: int) -> PseudoAnswer:
        stage_one = SnapKV(budget=self.budget, window=self.stage_one_window, kernel=self.kernel, pooling=self.pooling,
                           reduction=self.reduction)
        return PseudoAnswer(self.pseudo_tokens, stage_one)
