"""Request and result types of the one request flow."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Literal

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

ROLES = ("system", "user", "assistant", "tool")  # what chat templates take (the server maps developer to system)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


SEEDS = (-(2**63), 2**64 - 1)  # what torch's generators take


def check_text(name: str, value: object) -> None:
    """A string that is text: a lone surrogate ("\\ud800", from a broken JSON escape) is no character
    and no tokenizer can read it."""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {type(value).__name__} {value!r:.60}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ConfigError(f"{name} holds {value[error.start]!r} at character {error.start}, a lone surrogate "
                          "that is not a character; give valid Unicode text") from None


def check_messages(messages: object) -> None:
    """Chat messages: a non-empty list of {"role": system, user or assistant, "content": text}."""
    if not isinstance(messages, list | tuple) or not messages:
        raise ConfigError(f"messages must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                          f"got {type(messages).__name__} {messages!r:.60}")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or set(message) - {"role", "content"} or "role" not in message:
            raise ConfigError(f"messages[{index}] must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ConfigError(f"messages[{index}] has role {message['role']!r}; allowed: {', '.join(ROLES)}")
        check_text(f"messages[{index}]['content']", message.get("content", ""))


GREEDY_BELOW = 1e-5  # a temperature below this is greedy decoding


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked. temperature 0 (or below GREEDY_BELOW) is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not is_number(self.temperature) or not self.temperature >= 0:
            raise ConfigError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if not is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k must be an int >= 0 (0 means no top-k cut), got {self.top_k!r}")
        if self.seed is not None and (not is_int(self.seed) or not SEEDS[0] <= self.seed <= SEEDS[1]):
            raise ConfigError(f"seed must be an int or None, from -2**63 to 2**64 - 1 (what torch's generators "
                              f"take), got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_BELOW pick the likeliest token: dividing logits by them would overflow
        to inf and nan, and what they sample from is the likeliest token anyway."""
        return self.temperature < GREEDY_BELOW


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
    prompt_ids: list[int] | None = None  # the prompt as the target's token ids, read as they are (no template)
    logprobs: int | None = None  # report each new token's log-probability and this many likeliest (0: none)
    speculate: int | str | None = None  # draft tokens proposed per target call while decoding, or "auto" (None: the pair's)

    def __post_init__(self) -> None:
        for name in ("context", "question", "answer_prefix"):
            check_text(name, getattr(self, name))
        if self.system is not None:
            check_text("system", self.system)
        if self.messages is not None:
            check_messages(self.messages)
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.sampling, Sampling):
            raise ConfigError(f"sampling must be a draftkv.Sampling, got {type(self.sampling).__name__}")
        for name in ("chat_template", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.prompt_ids is not None and (not isinstance(self.prompt_ids, list | tuple) or not self.prompt_ids
                                            or not all(is_int(t) and t >= 0 for t in self.prompt_ids)):
            raise ConfigError(f"prompt_ids must be a non-empty list of token ids (ints >= 0), got {self.prompt_ids!r:.60}")
        if self.logprobs is not None and (not is_int(self.logprobs) or not 0 <= self.logprobs <= 20):
            raise ConfigError(f"logprobs must be None or an int from 0 to 20 (the likeliest tokens to list), "
                              f"got {self.logprobs!r}")
        if self.speculate not in (None, "auto") and (not is_int(self.speculate) or not 0 <= self.speculate <= 64):
            raise ConfigError(f"speculate must be None, 'auto' or a whole number of draft tokens per target call "
                              f"from 0 (off) to 64, got {self.speculate!r}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if not isinstance(self.stop, list | tuple) or not all(isinstance(s, str) for s in self.stop):
            raise ConfigError(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = tuple(s for s in self.stop if s)


@dataclass
class TokenLogprob:
    """One token's log-probability under the model, and the likeliest tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, log-probability), likeliest first


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
    dtype: str = ""  # what the models ran in: "bfloat16", "float32", ...
    kv_bytes_stored: int = 0  # what the (batch's) cache tensors really hold: kv_bytes plus layout padding
    kv_entries_sliding: int = 0  # per sliding-window layer and KV head: its window (or the prompt, if shorter)
    kv_bytes_sliding: int = 0  # what the sliding-window layers hold (part of kv_bytes); 0 without such layers
    lookahead_tokens: int = 0
    accepted_guess_tokens: int = 0  # guess tokens the target's check kept as the answer's first tokens
    guess_rounds: int = 0  # times the guess was corrected where the check stopped and guessed again
    full_cache_tokens: int = 0  # the answer's first tokens, chosen over the full cache before it was compressed
    speculation_rounds: int = 0  # target calls that checked draft proposals while decoding
    proposed_tokens: int = 0  # draft tokens proposed while decoding
    accepted_proposals: int = 0  # of them, kept by the target
    draft_kv_bytes: int = 0  # the draft's cache kept for speculation (prompt and answer so far), at its start
    new_tokens: int = 0
    time_to_first_token: float = 0.0
    total_time: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    note: str = ""

    @property
    def origin_tokens(self) -> int:
        """LLMLingua's name for the prompt's tokens."""
        return self.prompt_tokens

    @property
    def compressed_tokens(self) -> int:
        """LLMLingua's name for the prompt tokens the target read."""
        return self.kept_prompt_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "origin_tokens": self.origin_tokens, "compressed_tokens": self.compressed_tokens}

    def summary(self) -> str:
        """One line for people: prompt, kept, KV bytes and time per stage."""
        stages = ", ".join(f"{name} {seconds:.2f}s" for name, seconds in self.timings.items())
        ratio = self.kv_bytes / self.kv_bytes_dense if self.kv_bytes_dense else 1.0
        accepted = f"{self.accepted_guess_tokens} of it accepted, " if self.accepted_guess_tokens else ""
        if self.guess_rounds:
            accepted += f"guessed again {self.guess_rounds}x, {self.full_cache_tokens} tokens over the full cache, "
        if self.proposed_tokens:
            accepted += f"speculation {self.accepted_proposals}/{self.proposed_tokens} accepted, "
        line = (
            f"[{self.method}] prompt {self.prompt_tokens} tok, kept {self.kept_prompt_tokens} tok / "
            f"{self.kv_entries} KV per head, KV {_mib(self.kv_bytes_dense)} -> {_mib(self.kv_bytes)} "
            f"({ratio:.1%}), lookahead {self.lookahead_tokens}, {accepted}new {self.new_tokens} tok, "
            f"TTFT {self.time_to_first_token:.2f}s, total {self.total_time:.2f}s"
            f"{f' in {self.dtype}' if self.dtype else ''} ({stages})"
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
    logprobs: list[TokenLogprob] | None = None  # per new token, when the request asked (from the compressed cache)
    guess: str | None = None  # the answer guessed before compression that probed the cache (draft or LAQ++)
