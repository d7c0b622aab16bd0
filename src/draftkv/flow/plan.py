"""The plan: every decision of the flow, made once per consumer (a method over one batch) and row.

Station 1 keeps `prompt_budget` tokens of a row when that is fewer than the row has; station 2 keeps
`kv_budget` entries of what station 1 left when that is fewer, and only where the target has layers
a budget applies to (full attention: a sliding window keeps its window anyway). What a consumer asks
of the draft, which scorers attach where, which guess probes the cache, whether decoding evicts or
runs alone, and what the stats say of a budget that dropped nothing: all follow from those, here.
The executor carries the plan out and the results report it; neither decides again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from transformers import DynamicCache

from ..engine.speculation import AUTO_MOST, CallCosts
from ..methods import DraftScorer, KVScorer, Method, PseudoAnswer


@dataclass(frozen=True)
class LayerKinds:
    """Which kinds of attention layer a model caches: full (a KV budget applies) and sliding windows."""

    full: bool
    sliding: bool

    @classmethod
    def of(cls, config) -> LayerKinds:
        layers = DynamicCache(config=config.get_text_config()).layers
        sliding = [layer.is_sliding for layer in layers]
        return cls(full=not all(sliding), sliding=any(sliding))


def decodes_alone(method: Method, batch_size: int, target: LayerKinds, draft: LayerKinds | None) -> bool:
    """Whether a batch runs one request at a time for this method: a sliding window's left padding would
    differ from the full layers', and decode-time eviction would evict different entries per row."""
    sliding = target.sliding or (draft is not None and draft.sliding)
    return batch_size > 1 and (sliding or method.evicts_during_decode)


def speculation_of(speculate: int | str, eviction: Eviction | None, target: LayerKinds,
                   draft: LayerKinds | None, costs: CallCosts | None = None) -> tuple[int, str | None]:
    """The draft tokens a decode proposes per target call (at most, for `auto`), and why none where some
    were asked for. `auto` speculates where `costs` (measured on this device) say it decodes faster."""
    if not speculate:
        return 0, None
    if draft is None:
        why = "no draft that reads the target's tokens"
    elif eviction is not None:
        why = "decode-time eviction"
    elif target.sliding or draft.sliding:
        why = "a sliding-window layer cannot take refused proposals back"
    elif speculate != "auto":
        return speculate, None
    elif costs is not None and costs.best(AUTO_MOST):
        return AUTO_MOST, None
    else:
        why = f"auto measured no gain ({costs.summary()})" if costs is not None else "auto had no costs measured"
    return 0, f"decoded without speculation: {why}"


@dataclass(frozen=True)
class RowPlan:
    """One row of one consumer: what each station keeps of it."""

    prompt_length: int
    prompt_budget: int | None  # the method's station-1 budget for this row (None: it has no station 1)
    kv_budget: int | None  # its station-2 budget for what station 1 left (None: no station 2)
    drops_tokens: bool  # station 1 keeps fewer tokens than the row has
    drops_entries: bool  # station 2 keeps fewer entries than station 1 left, in full-attention layers
    lookahead: int  # draft tokens guessed for this row (0: none)

    @property
    def compressed(self) -> bool:
        return self.drops_tokens or self.drops_entries

    @property
    def draft_budget(self) -> int | None:
        """What the draft's cache keeps of the prompt when the decode speculates: the row's KV budget where
        station 2 drops entries, else its prompt budget where station 1 drops tokens (None: all of it, as
        for a budget too small to hold a window)."""
        budget = self.kv_budget if self.drops_entries else self.prompt_budget if self.drops_tokens else None
        return budget if budget is not None and 2 <= budget < self.prompt_length else None

    @property
    def stage_length(self) -> int:
        """The tokens the target reads: station 1's budget where it drops tokens (exactly what it keeps
        in the target's own tokens), else the whole row."""
        return self.prompt_budget if self.drops_tokens else self.prompt_length

    def notes(self, has_full_layers: bool) -> list[str]:
        """What the stats say of a budget that dropped nothing."""
        said = []
        if self.prompt_budget is not None and not self.drops_tokens:
            said.append(f"prompt budget {self.prompt_budget} >= prompt length {self.prompt_length}: the whole prompt "
                        "was kept")
        if self.kv_budget is not None and not has_full_layers:
            said.append("every layer is a sliding window, which keeps its window: no KV budget applies")
        elif self.kv_budget is not None and not self.drops_entries:
            said.append(f"budget {self.kv_budget} >= prompt length {self.stage_length}: ran dense")
        return said


@dataclass(frozen=True)
class DraftNeed:
    """What one consumer asks of the draft pass: a guess of the answer per row, prompt scores, or both."""

    lookahead: list[int]
    scorer: DraftScorer | None = None
    keeps_cache: bool = False  # the consumer speculates: its decode goes on from the draft's cache
    scores_cache: bool = False  # and the draft's own queries score that cache, to compress it
    guesses_again: bool = False  # the draft keeps its prompt's cache to guess again from a corrected prefix

    @property
    def needed(self) -> bool:
        return max(self.lookahead, default=0) > 0 or self.scorer is not None


@dataclass(frozen=True)
class Eviction:
    """Decode-time eviction: every `every` new tokens the cache is cut back to `budget` entries."""

    every: int
    budget: int


@dataclass
class Consumer:
    """One method over the batch, with every decision made for it."""

    method: Method
    rows: list[RowPlan]
    target: LayerKinds
    need: DraftNeed  # what it asks of the draft
    kv_scorer: KVScorer | None  # attached to the target's prefill: some row drops entries and the method scores
    guess: PseudoAnswer | None  # the target's own guess that probes the cache (LAQ++), when some row drops entries
    stage_one_scorer: KVScorer | None  # the guess's stage one scores the prefill too
    probes_lookahead: bool  # the draft's lookahead probes the full cache for the scorer
    eviction: Eviction | None  # decode-time eviction (a batch that evicts runs one request at a time)
    checks_guess: bool  # the target's reading of the guess checks it: what it agrees with starts the answer
    speculation: int = 0  # draft tokens proposed per target call while decoding (0: none)
    adapts: bool = False  # `auto`: each round proposes what the measured costs say decodes fastest
    speculation_note: str | None = None  # why a decode asked to speculate does not
    draft_scored: bool = False  # the draft's cache for speculation is compressed by its own attention
    rounds: int = 0  # times the checked guess is corrected and guessed again (the draft's guess only)

    @classmethod
    def of(cls, method: Method, lengths: list[int], max_new_tokens: list[int], target: LayerKinds,
           answers: bool = True, speculate: int | str = 0, draft: LayerKinds | None = None,
           draft_cache: str = "compressed", costs: CallCosts | None = None) -> Consumer:
        """The plan of `method` for rows of `lengths`; `answers`: the cache is decoded into the requests'
        answers (not read for a continuation of its own: a likelihood, a question asked later), so a
        checked guess may start them. `speculate`: the draft proposes that many tokens per target call
        while decoding, where it can (`draft`: its layer kinds; None without a usable draft), or "auto" as
        the measured `costs` say; `draft_cache`: what the draft's cache keeps for it (options.DRAFT_CACHES)."""
        rows = []
        for n, asked in zip(lengths, max_new_tokens, strict=True):
            prompt_budget = method.prompt_tokens(n)
            drops_tokens = prompt_budget is not None and prompt_budget < n
            stage_length = prompt_budget if drops_tokens else n
            kv_budget = method.kv_entries(stage_length)
            drops_entries = target.full and kv_budget is not None and kv_budget < stage_length
            compressed = drops_tokens or drops_entries
            rows.append(RowPlan(n, prompt_budget, kv_budget, drops_tokens, drops_entries,
                                method.draft_lookahead(asked) if compressed else 0))
        drops_entries = any(row.drops_entries for row in rows)
        need = DraftNeed([row.lookahead for row in rows],
                         method.draft_scorer() if any(row.drops_tokens for row in rows) else None)
        kv_scorer = method.kv_scorer() if drops_entries else None
        guess = method.guess(max(max_new_tokens)) if drops_entries else None
        stage_one = guess.stage_one.kv_scorer() if guess is not None and guess.stage_one is not None else None
        probes = kv_scorer is not None and guess is None and max(need.lookahead, default=0) > 0
        eviction = None
        if method.evicts_during_decode and len(rows) == 1 and rows[0].drops_entries:
            eviction = Eviction(method.evict_every, rows[0].kv_budget)
        checks = answers and method.verify_lookahead and (probes or guess is not None)
        speculation, why_not = speculation_of(speculate, eviction, target, draft, costs)
        if not answers:
            speculation, why_not = 0, None
        # Only a compressed draft cache needs the draft's attention (its scorer keeps the lookahead eager).
        scored = bool(speculation) and draft_cache == "compressed" and any(row.draft_budget for row in rows)
        if speculation and need.needed:
            need = replace(need, keeps_cache=True, scores_cache=scored)
        rounds = method.verify_rounds if checks and probes and not target.sliding else 0
        if rounds:  # the answer no longer starts with the draft's own guess: its decode reads the prompt anew
            need = replace(need, keeps_cache=False, scores_cache=False, guesses_again=True)
        return cls(method, rows, target, need, kv_scorer, guess, stage_one, probes, eviction, checks,
                   speculation, speculate == "auto" and speculation > 0, why_not, scored, rounds)

    @property
    def reads_whole_prompt(self) -> bool:
        """Station 1 drops nothing, so the target reads the prompt as it is (and can share its prefill)."""
        return not any(row.drops_tokens for row in self.rows)

    @property
    def drops_entries(self) -> bool:
        return any(row.drops_entries for row in self.rows)

    @property
    def joins_others(self) -> bool:
        """Its decode can join other consumers' in one batch: no eviction, no sliding window (a window's
        cache cannot be padded to another's), no speculation (each request speculates on its own)."""
        return self.eviction is None and not self.target.sliding and not self.speculation
