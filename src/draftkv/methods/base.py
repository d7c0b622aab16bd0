"""The tiny base of every method: a frozen, validated config that fills one or both stations.

Station 1 (prompt stage) keeps a subset of prompt tokens; station 2 (KV stage) keeps a subset
of KV entries per layer and KV head. A method answers the flow's questions (which stations it
fills, what it asks of the draft, how the target scores the prompt for it, who guesses the answer
that probes the target); the executor in flow/ asks them and never tests a method's class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError, PromptError
from .allocation import Allocation, check_allocation, get_allocation
from .scorers import DraftScorer, KVScorer, WindowScorer

if TYPE_CHECKING:
    import torch


Budget = int | float


def check_budget(budget: Budget, name: str = "budget") -> None:
    """A budget is a token count >= 1 or a ratio of the prompt in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise ConfigError(f"{name} must be a token count (int >= 1) or a ratio in (0, 1], got {budget!r}")
    if isinstance(budget, int) and budget < 1:
        raise ConfigError(f"{name} must be at least 1 token, got {budget}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise ConfigError(f"{name} as a ratio must be in (0, 1], got {budget}; give an int for a token count")


def resolve_budget(budget: Budget, prompt_length: int) -> int:
    """Tokens to keep of a prompt of `prompt_length`: the count, or ceil(ratio * n)."""
    return budget if isinstance(budget, int) else math.ceil(budget * prompt_length)


def check_window_in_budget(budget: Budget, window: int, minimum: int) -> None:
    """The window is part of the budget: a valid budget, and a window smaller than a token budget."""
    check_budget(budget)
    check_int("window", window, minimum)
    if isinstance(budget, int) and window >= budget:
        raise ConfigError(
            f"window ({window}) must be smaller than the budget ({budget}): the window is part of the budget "
            "and the rest is chosen by score"
        )


def budget_beyond_window(budget: Budget, window: int, prompt_length: int, unit: str) -> int:
    """The budget resolved for this prompt; it must leave room beyond the window when it compresses."""
    resolved = resolve_budget(budget, prompt_length)
    if resolved < prompt_length and resolved <= window:
        raise PromptError(
            f"budget {budget} of a {prompt_length}-token prompt keeps {resolved} {unit}, not more than the window "
            f"of {window}; give a larger budget or a smaller window"
        )
    return resolved


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")


def check_kernel(kernel: int) -> None:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ConfigError(
            f"pooling kernel must be an odd int >= 1 (so the scores keep their length; 1 means no pooling), "
            f"got {kernel!r}"
        )


@dataclass(frozen=True)
class Method:
    """A method with no stations filled: dense generation."""

    name: ClassVar[str] = "dense"
    summary: ClassVar[str] = "No compression: the reference for accuracy and cost."

    @property
    def compresses_prompt(self) -> bool:
        """Station 1: does it keep a subset of the prompt tokens (so the target reads fewer)?"""
        return False

    @property
    def compresses_kv(self) -> bool:
        """Station 2: does it keep a subset of the target's KV entries?"""
        return False

    def draft_lookahead(self, max_new_tokens: int) -> int:
        """Tokens the draft generates as a guess of the answer; 0 means no lookahead."""
        return 0

    def kv_entries(self, prompt_length: int) -> int | None:
        """KV entries to keep per layer and head for this prompt; None when there is no KV stage."""
        return None

    def prompt_tokens(self, prompt_length: int) -> int | None:
        """Prompt tokens to keep; None when there is no prompt stage."""
        return None

    def keep_tokens(self, prompt_ids: list[int], question_start: int, budget: int,
                    scores: torch.Tensor | None) -> torch.Tensor:
        """Station 1: the kept prompt positions [budget], sorted. scores: [n] from its draft scorer, if any."""
        raise NotImplementedError(f"{self.name} keeps no prompt tokens")

    def keep_positions(self, layer_scores: list[torch.Tensor], prompt_length: int, budget: int) -> list[torch.Tensor]:
        """Station 2: per layer, the kept prompt positions [H_kv, K], sorted; K may differ per layer, and -1
        marks the empty slots (at the front) of heads that keep fewer entries than others.

        layer_scores: per layer [H_kv, S], its KV scorer's scores of the row's first S positions (zeros
        for a method without a scorer)."""
        raise NotImplementedError(f"{self.name} keeps no KV entries")

    def draft_scorer(self) -> DraftScorer | None:
        """How the draft scores prompt tokens for station 1; None when it does not."""
        return None

    def kv_scorer(self) -> KVScorer | None:
        """How the target scores the prompt's entries for station 2; None: positions alone decide."""
        return None

    def guess(self, max_new_tokens: int) -> PseudoAnswer | None:
        """The target's own guess of the answer that probes its cache (LAQ++); None: the draft's
        lookahead is the guess, if the method asks for one."""
        return None

    def reading_probes(self, prompt_length: int, tokenizer: Any) -> list[tuple[int, int]]:
        """The probes the target reads after its prefill to score a prompt of `prompt_length` tokens, as
        (tokens the method adds, tokens of the prompt repeated) per probe: what limits on compute and
        context count (KVzip's reconstruction). None for most methods."""
        return []

    @property
    def evict_every(self) -> int:
        """Decode-time eviction: every this many new tokens, the cache is cut back to the budget (0: never)."""
        return 0

    @property
    def verify_rounds(self) -> int:
        """Times a checked guess is corrected where the check stops and guessed again (0: checked once)."""
        return 0

    @property
    def verify_lookahead(self) -> bool:
        """The target checks the guess it reads (the draft's lookahead, or its own pseudo-answer): the
        guessed tokens it agrees with, and its own next token, start the answer."""
        return False

    @property
    def evicts_during_decode(self) -> bool:
        return self.evict_every > 0

    @property
    def cache_layout(self) -> str:
        """How a ragged cache (layers or heads keeping different numbers of entries) is stored."""
        return "per-head"

    @property
    def keeps_original_positions(self) -> bool:
        """Kept prompt tokens keep their original positions (else they are renumbered 0..C-1)."""
        return False

    def uses_draft(self, max_new_tokens: int) -> bool:
        """Does a request that this method compresses need a draft pass at all?"""
        return self.draft_lookahead(max_new_tokens) > 0 or self.draft_scorer() is not None

    def target_reads_draft_tokens(self, max_new_tokens: int) -> bool:
        """The target reads the draft's lookahead tokens (as a probe), so both need one tokenizer."""
        return self.compresses_kv and self.draft_lookahead(max_new_tokens) > 0

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class PseudoAnswer:
    """The target guesses the answer itself: `tokens` greedy tokens from a copy of its cache that
    `stage_one` compressed (LAQ++), or from the whole cache when `stage_one` is None."""

    tokens: int
    stage_one: KVMethod | None = None


def help_of(method_class: type[Method]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of each parameter, for `draftkv methods` and error messages."""
    rows = []
    for f in fields(method_class):
        default = f.default_factory() if callable(f.default_factory) else f.default  # type: ignore[misc]
        rows.append((f.name, str(f.type), default, f.metadata.get("help", "")))
    return rows


def param(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class KVMethod(Method):
    """Station 2: keep `budget` prompt KV entries per layer and KV head."""

    budget: Budget = param(256, "KV entries kept per layer and head, window included (int), or a ratio of the prompt in (0, 1]")
    evict_every: int = param(0, "decode-time eviction: every this many new tokens, cut the cache back to the budget (0 = off)")

    def __post_init__(self) -> None:
        check_budget(self.budget)
        check_int("evict_every", self.evict_every, 0)

    @property
    def compresses_kv(self) -> bool:
        return True

    def kv_entries(self, prompt_length: int) -> int | None:
        return resolve_budget(self.budget, prompt_length)


@dataclass(frozen=True)
class WindowKVMethod(KVMethod):
    """Station 2 by a scorer (by default the window queries' attention), an allocation and protection:
    `budget - window` prefix entries per layer and KV head (on average: the allocation spreads the total)
    chosen by pooled score, plus the last `window` prompt entries, always kept."""

    window: int = param(32, "last prompt tokens always kept; their queries score the rest")
    kernel: int = param(7, "odd pooling kernel along keys (1 = no pooling)")
    pooling: str = param("max", "pooling of scores along keys: max or avg")
    reduction: str = param("max", "reduction over query heads of a group and window queries: max or mean")
    allocation: str = param("uniform", "how the budget is spread over layers and KV heads: uniform, pyramid "
                                       "(PyramidKV), ada (Ada-KV, within a layer) or global (one threshold "
                                       "over all; the same total)")
    alpha: float = param(0.2, "allocation ada: each head keeps at least this share of its uniform budget")
    beta: float = param(20, "allocation pyramid: the first layer keeps about 2 * beta - 1 times the last")
    layout: str = param("per-head", "storage of a ragged cache: per-head (exact; chosen by measurement) or padded (to the longest head, masked)")

    # Every prompt query scores the prefix (H2O), not only the window's.
    all_queries: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_window_in_budget(self.budget, self.window, minimum=1)
        check_kernel(self.kernel)
        check_choice("pooling", self.pooling, ("max", "avg"))
        check_choice("reduction", self.reduction, ("max", "mean"))
        check_choice("layout", self.layout, ("padded", "per-head"))
        check_int("evict_every", self.evict_every, 0)
        check_allocation(self.allocation)
        if self.evict_every and self.allocation != "uniform":
            raise ConfigError(f"decode-time eviction keeps a uniform cache: it cannot combine with allocation "
                              f"{self.allocation!r}; give allocation=uniform or evict_every=0")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, int | float) or not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        if isinstance(self.beta, bool) or not isinstance(self.beta, int | float) or self.beta < 1:
            raise ConfigError(f"beta must be a number >= 1, got {self.beta!r}")

    def kv_entries(self, prompt_length: int) -> int | None:
        return budget_beyond_window(self.budget, self.window, prompt_length, "entries")

    def kv_scorer(self) -> WindowScorer:
        return WindowScorer(self.window, self.reduction, all_queries=self.all_queries)

    @property
    def cache_layout(self) -> str:
        return self.layout

    def allocator(self) -> Allocation:
        return get_allocation(self.allocation, alpha=self.alpha, beta=self.beta)

    def keep_positions(self, layer_scores: list[torch.Tensor], prompt_length: int, budget: int) -> list[torch.Tensor]:
        import torch

        from ..engine.scoring import pool_scores

        window = torch.arange(prompt_length - self.window, prompt_length)
        pooled = [pool_scores(scores, self.kernel, self.pooling) for scores in layer_scores]
        return [with_window(kept, window) for kept in self.allocator().select(pooled, budget - self.window)]


@dataclass(frozen=True)
class SinkKVMethod(WindowKVMethod):
    """Station 2 by a score its scorer makes after the prefill: per layer and KV head the best
    `budget - window` entries, the first `sink` always among them, plus the window. Decode-time eviction
    only where the scorer can score the cache while decoding (its `decode_collector`)."""

    window: int = param(32, "last prompt tokens always kept (they are not scored)")
    kernel: int = param(1, "odd pooling kernel along keys (1 = none)")
    sink: int = param(4, "first prompt tokens always kept (attention sinks)")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("sink", self.sink, 0)
        if isinstance(self.budget, int) and self.sink + self.window >= self.budget:
            raise ConfigError(f"sink + window ({self.sink + self.window}) must be smaller than the budget "
                              f"({self.budget})")
        if self.evict_every and self.kv_scorer().decode_collector() is None:
            raise ConfigError(f"{self.name} scores the prompt once, after its prefill, and cannot score the cache "
                              "while decoding; decode-time eviction (evict_every) is not supported, give "
                              "evict_every=0")

    def keep_positions(self, layer_scores: list[torch.Tensor], prompt_length: int, budget: int) -> list[torch.Tensor]:
        import torch

        sinks = min(self.sink, layer_scores[0].shape[-1])  # first in line: ties keep the earlier position
        raised = [scores.index_fill(-1, torch.arange(sinks, device=scores.device), float("inf"))
                  for scores in layer_scores]
        return super().keep_positions(raised, prompt_length, budget)


def with_window(kept: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """A layer's kept positions [H_kv, K], sorted, from its mask of entries kept by score [H_kv, P] and the
    window; heads that keep fewer than the longest have -1 in their empty slots, at the front."""
    import torch

    per_head = [torch.cat([mask.nonzero().flatten(), window]) for mask in kept]
    width = max(len(p) for p in per_head)
    return torch.stack([torch.cat([torch.full((width - len(p),), -1, dtype=torch.long), p]) for p in per_head])


def check_bool(name: str, value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")


def check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class PromptMethod(Method):
    """Station 1: keep `budget` prompt tokens (the window included); the target sees only them."""

    budget: Budget = param(1024, "prompt tokens kept, window included (int), or a ratio of the prompt in (0, 1]")
    window: int = param(64, "last prompt tokens always kept")
    positions: str = param("renumbered", "positions of kept tokens: renumbered (0..C-1) or original")

    def __post_init__(self) -> None:
        check_window_in_budget(self.budget, self.window, minimum=0)
        check_choice("positions", self.positions, ("renumbered", "original"))

    @property
    def compresses_prompt(self) -> bool:
        return True

    @property
    def keeps_original_positions(self) -> bool:
        return self.positions == "original"

    def prompt_tokens(self, prompt_length: int) -> int | None:
        return budget_beyond_window(self.budget, self.window, prompt_length, "tokens")


def first_in_order(candidates: torch.Tensor, budget: int) -> torch.Tensor:
    """The first `budget` distinct positions of `candidates` (in their order), sorted."""
    import torch

    unique, inverse = torch.unique(candidates, return_inverse=True)  # unique sorts, so track the order
    first = torch.full((unique.shape[0],), candidates.shape[0], dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(candidates.shape[0]), reduce="amin")
    return unique[torch.argsort(first)][:budget].sort().values
