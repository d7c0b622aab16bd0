"""Checking a guessed answer: the target's own choice at every guessed position, read from one pass;
and speculative decoding, where the draft guesses a few tokens at a time and the target checks them.

Greedy: keep the longest prefix of the guess that the target's greedy tokens agree with, then the
target's own token at the first disagreement (or after the whole guess). Sampling: speculative
sampling (Leviathan et al. 2023; Chen et al. 2023): a guessed token x is kept with probability
min(1, p(x) / q(x)), where p is the target's distribution and q the guesser's; at the first token
not kept, the target's token is drawn from the residual max(0, p - q), normalised; after a guess kept
whole, from p. The tokens so chosen have exactly the target's distribution. A greedy guess is
q = one-hot, so a guessed token is kept with probability p(x).

`auto` speculation decides from measured costs (CallCosts): k proposals pay k draft steps and one
target call that reads k + 1 tokens, and yield on average (1 - a^(k+1)) / (1 - a) tokens at a per-token
acceptance rate a; plain decoding pays one 1-token target call per token. The calls are timed once, over
a short cache (what matters is their ratio), and a is what the pair has accepted so far. The k with the
most tokens per second is chosen each round, and none (plain decoding) where no k beats plain decoding
by a margin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache

from ..types import Sampling
from .attention import DECODE_ATTENTION
from .cache import kv_bytes, reserve
from .decoding import (
    Decoded,
    DecodeOutput,
    DecodeSpec,
    RowOutput,
    make_generators,
    sampling_probs,
    takes_static,
    token_logprobs,
)
from .static import StaticStep


def acceptance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The probability of keeping each guessed token [V]: min(1, p / q) where q > 0."""
    return torch.where(q > 0, torch.clamp(p / q.clamp(min=torch.finfo(q.dtype).tiny), max=1.0), 0.0)


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """What the target draws from after refusing a guessed token [V]: max(0, p - q), normalised (p where
    p equals q, which then refuses nothing)."""
    left = torch.clamp(p - q, min=0.0)
    total = left.sum()
    return left / total if total > 0 else p


def check_guess(guess: list[int], logits: torch.Tensor, sampling: Sampling,
                generator: torch.Generator | None = None, guess_probs: torch.Tensor | None = None) -> list[int]:
    """The answer's first tokens from a guess of length L: the kept prefix of the guess, then one token of
    the target's own (so 1 to L + 1 tokens).

    logits: [L + 1, V], the target's logits for answer token i given the guess's first i tokens.
    guess_probs: [L, V], the guesser's distributions for a sampled guess (None: a greedy guess, q one-hot)."""
    if sampling.greedy:
        choices = logits.argmax(dim=-1).tolist()
        kept = 0
        while kept < len(guess) and choices[kept] == guess[kept]:
            kept += 1
        return [*guess[:kept], choices[kept]]
    for at, token in enumerate(guess):
        p = sampling_probs(logits[at], sampling)
        q = guess_probs[at].float() if guess_probs is not None else F.one_hot(torch.tensor(token), p.numel()).to(p)
        if float(torch.rand((), generator=generator, device=p.device)) < float(acceptance(p, q)[token]):
            continue
        return [*guess[:at], int(torch.multinomial(residual(p, q), 1, generator=generator))]
    p = sampling_probs(logits[len(guess)], sampling)
    return [*guess, int(torch.multinomial(p, 1, generator=generator))]


AUTO_MOST = 8  # the most proposals per target call that `auto` considers
TIMED_WIDTHS = (1, 2, 3, 5, 9)  # the target call widths timed up front (k + 1 for k = 0, 1, 2, 4, 8)
PRIOR_ACCEPTANCE, PRIOR_WEIGHT = 0.7, 8.0  # before a pair has speculated: a rate, held as that many proposals
GAIN_NEEDED = 1.05  # speculate only where the cost model expects this much more than plain decoding's speed
CALIBRATION_TOKENS = 128  # the cache the costs are timed over


@dataclass
class CallCosts:
    """What speculation costs on this device: seconds of one target call by the number of tokens it
    reads and of one draft step (timed once, over the same short cache), and the acceptance rate the
    pair has shown (a prior until it speculates)."""

    target: dict[int, float]
    draft_step: float
    accepted: float = PRIOR_ACCEPTANCE * PRIOR_WEIGHT
    proposed: float = PRIOR_WEIGHT

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed

    def target_call(self, width: int) -> float:
        """A target call reading `width` tokens: as timed, else interpolated between the nearest widths
        timed (extrapolated from the widest two past them)."""
        if width in self.target:
            return self.target[width]
        widths = sorted(self.target)
        below = max((w for w in widths if w < width), default=widths[0])
        above = min((w for w in widths if w > width), default=None)
        if above is None:
            below, above = (widths[-2], widths[-1]) if len(widths) > 1 else (widths[0], widths[0])
        if above == below:
            return self.target[below]
        slope = (self.target[above] - self.target[below]) / (above - below)
        return max(self.target[below] + slope * (width - below), self.target[widths[0]])

    def gain(self, proposals: int) -> float:
        """Expected tokens per second with `proposals` per target call, over plain decoding's."""
        rate = min(self.acceptance, 1 - 1e-6)
        tokens = (1 - rate ** (proposals + 1)) / (1 - rate)
        return tokens * self.target_call(1) / (proposals * self.draft_step + self.target_call(proposals + 1))

    def best(self, most: int) -> int:
        """The proposals per target call (1..most) expected to decode fastest, or 0 where none gains enough."""
        gains = {k: self.gain(k) for k in range(1, most + 1)}
        chosen = max(gains, key=gains.__getitem__, default=0)
        return chosen if chosen and gains[chosen] >= GAIN_NEEDED else 0

    def checked(self, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted

    def summary(self) -> str:
        k = max(range(1, AUTO_MOST + 1), key=self.gain)
        return (f"target call {self.target_call(1) * 1e3:.0f} ms for 1 token, {self.target_call(k + 1) * 1e3:.0f} ms for "
                f"{k + 1}; draft step {self.draft_step * 1e3:.0f} ms; acceptance {self.acceptance:.0%}: "
                f"{k} proposed per call would decode at {self.gain(k):.2f}x plain decoding's speed")


def _synchronized(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def measure_costs(target: torch.nn.Module, draft: torch.nn.Module, tokens: int = CALIBRATION_TOKENS) -> CallCosts:
    """Time a target call at each width of TIMED_WIDTHS, and a draft step, over a cache of `tokens`
    (the best of two after a warm-up; refused tokens are cropped as speculation does)."""
    from .cache import new_cache

    def timings(model: torch.nn.Module, widths: tuple[int, ...]) -> dict[int, float]:
        vocab = min(model.config.get_text_config().vocab_size, 1000)
        generator = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, vocab, (tokens,), generator=generator).tolist()
        cache = new_cache(model.config)
        _call(model, cache, prompt, 0, 1)
        seconds = {}
        for width in (widths[0], *widths):
            runs = []
            for _ in range(2):
                started = _synchronized(model.device)
                _call(model, cache, prompt[:width], tokens, 1)
                runs.append(_synchronized(model.device) - started)
                drop_newest(cache, width)
            seconds[width] = min(runs)
        return seconds

    return CallCosts(timings(target, TIMED_WIDTHS), timings(draft, (1,))[1])


@dataclass
class Drafter:
    """The draft's side of speculative decoding: its model, its cache of the prompt and of the answer's
    first `read` tokens, the position its first answer token has (its own numbering of the prompt), and
    how many tokens it proposes per target call."""

    model: torch.nn.Module
    cache: DynamicCache
    proposals: int
    position: int
    read: int = 0
    fill: Callable[[], None] | None = None  # fills `cache` before the first proposal (after the first token)
    costs: CallCosts | None = None  # `auto`: each round proposes what these costs say decodes fastest


@dataclass
class SpeculationStats:
    rounds: int = 0  # target calls that checked proposals
    proposed: int = 0  # draft tokens proposed
    accepted: int = 0  # of them, kept
    draft_seconds: float = 0.0  # the draft's proposing
    draft_kv_bytes: int = 0  # what the draft's cache held when the decode started


def drop_newest(cache: DynamicCache, count: int) -> None:
    """Forget every layer's last `count` entries (proposals the target refused)."""
    if count > 0:
        for layer in cache.layers:
            layer.crop(-count)


def _call(model: torch.nn.Module, cache: DynamicCache, tokens: list[int], position: int, keep: int,
          attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The model reads `tokens` at `position`.. over `cache` (`attention_mask`: [1, cache + tokens]); the
    logits of the last `keep` [keep, V]."""
    device = model.device
    with torch.inference_mode(), sdpa_kernel(DECODE_ATTENTION):
        out = model(input_ids=torch.tensor([tokens], device=device),
                    position_ids=torch.arange(position, position + len(tokens), device=device)[None],
                    attention_mask=attention_mask, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0].float()


class EagerReader:
    """A model reading tokens over a cache that grows by them (the eager step); refused ones are cropped.
    `attention_mask`: [1, cache length], the row's mask where its cache has slots it hides (padding)."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, attention_mask: torch.Tensor | None,
                 room: int) -> None:
        reserve(cache, room)
        self.model, self.cache, self.mask = model, cache, attention_mask

    def read(self, tokens: list[int], position: int, keep: int) -> torch.Tensor:
        """The logits of the last `keep` of `tokens`, read at `position`.. [keep, V]."""
        if self.mask is not None:
            self.mask = F.pad(self.mask, (0, len(tokens)), value=1)
        return _call(self.model, self.cache, tokens, position, keep, self.mask)

    def take_back(self, count: int) -> None:
        drop_newest(self.cache, count)
        if self.mask is not None and count > 0:
            self.mask = self.mask[:, : self.mask.shape[1] - count]


class StaticReader:
    """The same over the static step's fixed slots (a CUDA graph per number of tokens read, on CUDA); the
    cache is copied into them and let go of."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, attention_mask: torch.Tensor | None,
                 room: int) -> None:
        self.step = StaticStep(model, cache, attention_mask, room, consume=True)
        self.device = model.device

    def read(self, tokens: list[int], position: int, keep: int) -> torch.Tensor:
        logits = self.step.read(torch.tensor([tokens], device=self.device),
                                torch.arange(position, position + len(tokens), device=self.device)[None])
        return logits[0, -keep:].float()

    def take_back(self, count: int) -> None:
        self.step.take_back(count)


def reader(backend: str, model: torch.nn.Module, cache: DynamicCache, attention_mask: torch.Tensor | None,
           room: int) -> EagerReader | StaticReader:
    """How a model reads during speculation: the decode backend's step (decoding.takes_static), with room
    for `room` more tokens."""
    chosen = StaticReader if takes_static(backend, model, cache) else EagerReader
    return chosen(model, cache, attention_mask, room)


def speculate(model: torch.nn.Module, cache: DynamicCache, first_logits: torch.Tensor, position: int,
              spec: DecodeSpec, drafter: Drafter, attention_mask: torch.Tensor | None = None,
              ) -> tuple[DecodeOutput, SpeculationStats]:
    """One row's decode with a draft: each round the draft proposes up to `drafter.proposals` tokens from
    its own cache, and the target reads its last token and the proposals in one call and keeps what
    `check_guess` keeps (greedy: the agreeing prefix and its own next token, so exactly its greedy
    tokens; sampling: speculative sampling, so exactly its distribution). Refused proposals leave both
    caches again. `position`: the logical position of the row's next token; `spec` holds one row;
    `attention_mask`: [1, cache length], the row's mask where its cache has slots it hides (padding)."""
    sampling, limit = spec.samplings[0], spec.max_new_tokens[0]
    row = RowOutput(spec.tokenizer, limit, spec.eos_token_ids[0], (spec.stops or [()])[0],
                    logprobs=spec.logprobs is not None and spec.logprobs[0] is not None)
    wanted = spec.logprobs[0] if spec.logprobs is not None else None
    given = spec.accepted[0] if spec.accepted else None
    generator = given.generator if given is not None and given.generator is not None else \
        make_generators([sampling], first_logits.device)[0]
    stats = SpeculationStats()
    target = reader(spec.backend, model, cache, attention_mask, limit + drafter.proposals + 1)
    draft = None  # the draft's reader, made when it first proposes
    if given is not None:  # a checked guess: its tokens but the last are in the target's cache already
        chosen, logprobs = given.token_ids, given.logprobs
    else:
        chosen = check_guess([], first_logits[:1].float(), sampling, generator)
        logprobs = token_logprobs(first_logits[:1], chosen, [wanted]) if wanted is not None else None
    first_token_at = time.perf_counter()
    answer: list[int] = []  # every token chosen so far
    target_at = position + len(chosen) - 1  # where the last chosen token goes (not read by the target yet)
    read = drafter.read  # answer tokens the draft has read
    steps = 0
    while True:
        for token, logprob in zip(chosen, logprobs or [None] * len(chosen), strict=True):
            if row.finish is not None:
                break
            if spec.cancelled is not None and spec.cancelled(0):
                row.end("cancelled")
                break
            row.take(token, logprob)
        answer += chosen
        if spec.on_text is not None and (piece := row.new_text()):
            spec.on_text(0, piece)
        if row.finish is not None:
            break
        # The draft reads what it has not read yet of the answer, then proposes; the last proposal is
        # not read (it may be refused).
        count = min(drafter.proposals if drafter.costs is None else drafter.costs.best(drafter.proposals),
                    limit - len(row.token_ids) - 1)
        if count and draft is None:
            if drafter.fill is not None:  # the draft reads the prompt only once a proposal is wanted
                drafter.fill()
                drafter.fill = None
            stats.draft_kv_bytes = kv_bytes(drafter.cache)
            draft = reader(spec.backend, drafter.model, drafter.cache, None,
                           limit + drafter.proposals + len(answer) + 1)
        started = time.perf_counter()
        proposed, guess_probs = [], []
        feed = answer[read:]
        vocab = first_logits.shape[-1]
        for _ in range(count):
            logits = draft.read(feed, drafter.position + read, 1)[-1]
            # The draft proposes among the target's tokens only (a vocabulary padded differently).
            logits = logits[:vocab] if logits.numel() >= vocab else F.pad(logits, (0, vocab - logits.numel()),
                                                                            value=float("-inf"))
            read += len(feed)
            if sampling.greedy:
                token = int(logits.argmax())
            else:
                probs = sampling_probs(logits, sampling)
                token = int(torch.multinomial(probs, 1, generator=generator))
                guess_probs.append(probs)
            proposed.append(token)
            feed = [token]
        stats.draft_seconds += time.perf_counter() - started
        logits = target.read([answer[-1], *proposed], target_at, count + 1)
        steps += 1
        chosen = check_guess(proposed, logits, sampling, generator, torch.stack(guess_probs) if guess_probs else None)
        kept = len(chosen) - 1
        stats.rounds += count > 0
        stats.proposed += count
        stats.accepted += kept
        if drafter.costs is not None:
            drafter.costs.checked(count, kept)
        logprobs = token_logprobs(logits[: len(chosen)], chosen, [wanted] * len(chosen)) if wanted is not None \
            else None
        target.take_back(count - kept)  # the target read its last token and every proposal
        # The draft read the answer and every proposal but the last: keep what the target kept.
        refused = max(count - 1, 0) - min(kept, max(count - 1, 0))
        if draft is not None:
            draft.take_back(refused)
        read -= refused
        target_at += kept + 1
    decoded = Decoded(row.token_ids, row.shown, row.finish or "length", row.logprobs)
    return DecodeOutput([decoded], first_token_at, steps), stats
