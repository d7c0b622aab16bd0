"""Scorers: what a method hands the flow so the prompt gets scored its way.

A KV scorer (station 2) attaches a collector to the target's prefill (and to the probe of a guess,
when the method has one) and then turns what was collected, with anything more it reads from the
target (`TargetReading`), into per-layer scores of the prompt's entries. A draft scorer (station 1)
does the same on the draft pass, per prompt token. Scorers are frozen dataclasses: consumers whose
scorers are equal share one collector through the prefill, so the prompt is scored once.

A method with its own rule brings its own scorer class in its own file (KVzip's reconstruction
probe, KeyDiff's key diversity); the flow only calls what is declared here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError

if TYPE_CHECKING:  # the engine comes in where a scorer runs, so the registry answers without torch
    import torch
    from transformers import DynamicCache

    from ..engine.attention import Collector, PromptCollector, WindowCollector
    from ..engine.eviction import DecodeScores
    from ..flow.batch import PaddedBatch
    from ..prompt import EncodedPrompt


class TargetReading(Protocol):
    """What a KV scorer may read of the target once it has prefilled the prompt (the full cache)."""

    model: torch.nn.Module
    tokenizer: Any
    cache: DynamicCache
    batch: PaddedBatch
    prompts: list[EncodedPrompt] | None  # the prompts the batch holds; None when it holds a prompt stage's kept tokens

    def probe(self, tokens: list[list[int]], counted: list[list[bool]], collector: Collector, stage: str) -> None:
        """Read `tokens` per row after the prompt with `collector` capturing, then drop their entries
        again; only the queries marked in `counted` score. Timed as `stage`."""

    def full_layer_keys(self) -> list[torch.Tensor]:
        """The keys [B, H_kv, N, d] of every layer a KV budget applies to (full attention), in order."""


class KVScorer(Protocol):
    """How the target scores the prompt's KV entries for station 2."""

    def collector(self, width: int) -> WindowCollector | None:
        """What captures the target's prefill of a `width`-column batch (and the probe of the method's
        guess); None: the prefill is read plainly."""

    def scores(self, collected: WindowCollector | None, reading: TargetReading) -> list[torch.Tensor]:
        """Per layer a budget applies to, [B, H_kv, S] scores of the first S prompt columns (the
        method's `keep_positions` reads a row's own columns of them)."""

    def decode_collector(self) -> DecodeScores | None:
        """What scores the cache while decoding, for decode-time eviction; None: this scorer cannot."""


@dataclass(frozen=True)
class WindowScorer:
    """The target's own queries score the prompt: the last `window` prompt tokens (and the probe of a
    guess), or every prompt token (H2O). The window itself is kept by the method, so it is not scored."""

    window: int
    reduction: str = "max"  # over the query heads of a group and the queries
    all_queries: bool = False

    def collector(self, width: int) -> WindowCollector:
        from ..engine.attention import WindowCollector

        collector = WindowCollector(width - self.window, self.reduction)
        collector.score_last(width if self.all_queries else self.window)
        return collector

    def scores(self, collected: WindowCollector | None, reading: TargetReading) -> list[torch.Tensor]:
        return collected.layer_scores()

    def decode_collector(self) -> DecodeScores:
        """The generated tokens' attention: the max over the last `window` steps (H2O: the sum over all)."""
        from ..engine.eviction import AttentionHistory

        return AttentionHistory(self.window, summed=self.all_queries)


class DraftScorer(Protocol):
    """How the draft pass scores each prompt token for station 1."""

    reads_hidden: bool  # it needs the draft's last hidden states of the prompt

    def collector(self, width: int, draft_layers: int) -> PromptCollector | None:
        """What captures the draft's prefill and lookahead steps; None: nothing is captured."""

    def token_scores(self, collected: PromptCollector | None, step_valid: torch.Tensor,
                     information: torch.Tensor | None) -> torch.Tensor:
        """[B, width] per prompt column. step_valid: [B, steps] which steps (the prefill, then each
        lookahead token) belong to this consumer; information: the draft's self-information, when read."""


def first_scoring_layer(start_layer: int | None, num_layers: int) -> int:
    """The first draft layer whose attention counts: the one given, or a third of the way down (the
    paper's 8 of 24), so a draft of any depth works."""
    return num_layers // 3 if start_layer is None else start_layer


@dataclass(frozen=True)
class DraftAttention:
    """The draft's attention scores the prompt: its last `window` queries, then each lookahead token."""

    window: int  # last prompt queries that score the prompt
    start_layer: int | None = 0  # None: a third of the draft's layers (the paper's 8 of 24)
    weighted: bool = False  # window queries weighted linearly from 0 (oldest) to 1 (newest)
    head_reduction: str = "max"  # over heads and queries
    layer_reduction: str = "max"
    step_reduction: str = "max"  # over the prefill and each lookahead token

    reads_hidden = False

    def collector(self, width: int, draft_layers: int) -> PromptCollector:
        from ..engine.attention import PromptCollector

        start_layer = first_scoring_layer(self.start_layer, draft_layers)
        if start_layer >= draft_layers:
            raise ConfigError(f"start_layer is {start_layer} but the draft has {draft_layers} layers; "
                              f"give a start_layer below {draft_layers}, or none for a third of the draft's layers")
        return PromptCollector(width, self.window, start_layer, self.weighted, self.head_reduction,
                               self.layer_reduction)

    def token_scores(self, collected: PromptCollector | None, step_valid: torch.Tensor,
                     information: torch.Tensor | None) -> torch.Tensor:
        return collected.token_scores(step_valid, self.step_reduction)


@dataclass(frozen=True)
class SelfInformation:
    """The draft's surprise at each prompt token, -log p(token | prefix) (LLMLingua-style)."""

    reads_hidden = True

    def collector(self, width: int, draft_layers: int) -> None:
        return None

    def token_scores(self, collected: PromptCollector | None, step_valid: torch.Tensor,
                     information: torch.Tensor | None) -> torch.Tensor:
        return information
