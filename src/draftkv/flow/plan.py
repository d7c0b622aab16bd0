"""The plan: N consumers (a method with its budgets, per request) over one batch of requests.

"Which budget does what" lives here and nowhere else: station 1 keeps `prompt` tokens of a row, and
station 2 keeps `kv` entries of what station 1 left. What a consumer asks of the draft follows from
them: rows kept whole ask nothing (a dense run needs no guess).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..methods import DraftScoring, Method


@dataclass(frozen=True)
class DraftNeed:
    """What one consumer asks of the draft pass: a guess of the answer (per row), prompt scores, or both."""

    lookahead: list[int]
    scoring: DraftScoring | None = None
    information: bool = False  # the self-information of every prompt token (LLMLingua-style)

    @property
    def needed(self) -> bool:
        return max(self.lookahead, default=0) > 0 or self.scoring is not None or self.information


@dataclass
class Budgets:
    """Per row: what station 1 keeps of the prompt, and what station 2 keeps of what is left."""

    prompt: list[int | None]
    compress_prompt: list[bool]
    kv: list[int | None]
    compressing: list[bool]  # either station drops something

    @classmethod
    def of(cls, method: Method, lengths: list[int]) -> Budgets:
        prompt = [method.prompt_tokens(n) for n in lengths]
        compress_prompt = [b is not None and b < n for b, n in zip(prompt, lengths, strict=True)]
        # The KV stage runs on what station 1 leaves, which is exactly its budget.
        stage_lengths = [b if c else n for b, c, n in zip(prompt, compress_prompt, lengths, strict=True)]
        kv = [method.kv_entries(n) for n in stage_lengths]
        compress_kv = [b is not None and b < n for b, n in zip(kv, stage_lengths, strict=True)]
        return cls(prompt, compress_prompt, kv, [p or k for p, k in zip(compress_prompt, compress_kv, strict=True)])

    def draft_need(self, method: Method, max_new_tokens: list[int]) -> DraftNeed:
        """Nothing for rows kept whole; prompt scores when station 1 drops tokens."""
        lookahead = [method.draft_lookahead(m) if c else 0 for m, c in zip(max_new_tokens, self.compressing, strict=True)]
        drops = any(self.compress_prompt)
        return DraftNeed(lookahead, method.draft_scoring() if drops else None, method.needs_self_information and drops)


@dataclass
class Consumer:
    """One method over the batch: its budgets and what it asks of the draft."""

    method: Method
    budgets: Budgets
    need: DraftNeed

    @classmethod
    def of(cls, method: Method, lengths: list[int], max_new_tokens: list[int]) -> Consumer:
        budgets = Budgets.of(method, lengths)
        return cls(method, budgets, budgets.draft_need(method, max_new_tokens))

    @property
    def reads_whole_prompt(self) -> bool:
        """Station 1 drops nothing, so the target reads the prompt as it is (and can share its prefill)."""
        return not any(self.budgets.compress_prompt)
