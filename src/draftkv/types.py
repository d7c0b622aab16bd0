"""Request and result types of the one request flow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from .errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature 0 is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 means no top-k cut), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Request:
    """One generation request.

    Either `context` + `question` (the question goes at the end of the user turn, where the
    window queries see it) or chat `messages` (the last message is treated as the question).
    """

    context: str = ""
    question: str = ""
    messages: list[dict[str, str]] | None = None
    system: str | None = None
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    chat_template: bool = True
    answer_prefix: str = ""  # the start of the answer, which the model continues (after the chat template)
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks); stop strings still apply

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(s for s in self.stop if s)


@dataclass
class Stats:
    """What one request kept, what it cost and where its time went."""

    method: str
    prompt_tokens: int
    kept_prompt_tokens: int
    kv_entries: int  # per full-attention layer and KV head, right after compression (the mean, for ragged caches)
    kv_bytes_dense: int  # the full prompt cache, every layer (a sliding-window layer holds at most its window)
    kv_bytes: int  # the entries the target decoded from, right after compression, every layer
    compressed: bool
    kv_bytes_stored: int = 0  # what the (batch's) cache tensors really hold: kv_bytes plus layout padding
    kv_entries_sliding: int = 0  # per sliding-window layer and KV head: its window (or the prompt, if shorter)
    kv_bytes_sliding: int = 0  # what the sliding-window layers hold (part of kv_bytes); 0 without such layers
    lookahead_tokens: int = 0
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for people: prompt, kept, KV bytes and time per stage."""
        stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings.items())
        ratio = self.kv_bytes / self.kv_bytes_dense if self.kv_bytes_dense else 1.0
        line = (
            f"[{self.method}] prompt {self.prompt_tokens} tok, kept {self.kept_prompt_tokens} tok / "
            f"{self.kv_entries} KV per head, KV {_mib(self.kv_bytes_dense)} -> {_mib(self.kv_bytes)} "
            f"({ratio:.1%}), lookahead {self.lookahead_tokens}, new {self.new_tokens} tok, "
            f"TTFT {self.time_to_first_token:.2f}s, total {self.total_time:.2f}s ({stages})"
        )
        return f"{line}; {self.note}" if self.note else line


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class Result:
    """The target's answer to one request, with its stats.

    `kept_positions` lists, per layer, the original prompt positions kept for each KV head
    (shape [kv_heads, kept]); None when the KV cache was not compressed. `kept_tokens` are the
    prompt positions the prompt stage kept ([kept]); None when the target read the whole prompt.
    """

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    stats: Stats
    kept_positions: list[torch.Tensor] | None = None
    kept_tokens: torch.Tensor | None = None
