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
acceptance rate a; plain decoding pays one 1-token target call per token. The calls are timed once per
pair, over a short cache, and a is what the pair has accepted so far. Each decode then corrects those
costs with its own calls over its own cache (AutoProposals: it starts with plain calls, which time the
1-token call, and times every call after), and chooses each round the k with the most tokens per second,
or none where no k beats plain decoding by a margin. Where the draft does not hold the prompt yet, its
first proposal waits for it to read the prompt, so auto speculates only where the expected saving over
the tokens left exceeds that reading's cost.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel
from transformers import DynamicCache

from ..errors import ConfigError
from ..types import Sampling
from .attention import DECODE_ATTENTION, few_queries
from .cache import kv_bytes, reserve, select_rows
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
from .static import StaticStep, supports_static


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
        with few_queries(model):
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


PLAIN_START = 2  # `auto` times this many plain calls over the decode's own cache before it proposes
TIMINGS_KEPT = 8  # per call width, the latest timings a decode judges by (their median)


@dataclass
class AutoProposals:
    """`auto` in one decode: the pair's CallCosts corrected by this decode's own calls over its own cache,
    and what the draft's first reading of the prompt would cost (`fill_seconds`; 0 where it holds it)."""

    device: CallCosts
    fill_seconds: float = 0.0
    target_seen: dict[int, deque[float]] = field(default_factory=dict)
    draft_seen: deque[float] = field(default_factory=lambda: deque(maxlen=TIMINGS_KEPT))
    declined: str | None = None  # why it never proposed: reading the prompt would cost more than it saves

    def costs(self) -> CallCosts:
        """The pair's costs with this decode's timings where it has them. A width not timed here is the
        pair's figure times how much dearer this decode's calls were than the pair's at the widths it has
        timed (interpolated between the nearest two, the nearest one's past them)."""
        seen = {width: statistics.median(times) for width, times in self.target_seen.items()}
        factors = sorted((width, seconds / self.device.target_call(width)) for width, seconds in seen.items())

        def target_call(width: int) -> float:
            if width in seen:
                return seen[width]
            if not seen:
                return self.device.target_call(width)
            below = [point for point in factors if point[0] < width] or factors[:1]
            above = [point for point in factors if point[0] > width] or factors[-1:]
            (low, low_factor), (high, high_factor) = below[-1], above[0]
            if high == low:
                return self.device.target_call(width) * low_factor
            return self.device.target_call(width) * (low_factor + (high_factor - low_factor) * (width - low) / (high - low))

        draft_step = statistics.median(self.draft_seen) if self.draft_seen else self.device.draft_step
        return CallCosts({width: target_call(width) for width in sorted({*TIMED_WIDTHS, *seen})}, draft_step,
                         self.device.accepted, self.device.proposed)

    def proposals(self, most: int, left: int, filled: bool) -> int:
        """What to propose this round (0: a plain call), with `left` tokens at most still to decode and
        the draft holding the prompt (`filled`) or not."""
        if self.declined is not None or len(self.target_seen.get(1, ())) < PLAIN_START:
            return 0
        costs = self.costs()
        chosen = costs.best(min(most, left))
        if not chosen or filled:
            return chosen
        saving = left * costs.target_call(1) * (1 - 1 / costs.gain(chosen))
        if saving > self.fill_seconds:
            return chosen
        self.declined = (f"auto decoded without speculation: the draft would first read the prompt (about "
                         f"{self.fill_seconds:.1f} s) to save about {saving:.1f} s over the {left} tokens left")
        return 0

    def timed(self, width: int, target_seconds: float, proposals: int, draft_seconds: float) -> None:
        """A round's timings: the target's call reading `width` tokens, the draft's proposing."""
        self.target_seen.setdefault(width, deque(maxlen=TIMINGS_KEPT)).append(target_seconds)
        if proposals:
            self.draft_seen.append(draft_seconds / proposals)


@dataclass
class Drafter:
    """The draft's side of speculative decoding: its model, its cache of each row's prompt and of the
    answer's first `read` tokens, the position each row's first answer token has (its own numbering of
    the prompt), and how many tokens it proposes per target call."""

    model: torch.nn.Module
    cache: DynamicCache | None
    proposals: int
    positions: list[int]
    read: list[int]
    fill: Callable[[], None] | None = None  # fills `cache` before the first proposal (after the first token)
    auto: AutoProposals | None = None  # `auto`: each round proposes what it says decodes fastest
    row_bytes: list[int] | None = None  # each row's share of `cache` (None: all of it, one row)
    widths: list[int | None] | None = None  # each row's own most proposals (None: `proposals`, or auto's)


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

    def read(self, tokens: list[list[int]], positions: list[int], keep: int) -> torch.Tensor:
        """The logits of the last `keep` of each row's `tokens`, read at its position.. [B, keep, V]."""
        if self.mask is not None:
            self.mask = F.pad(self.mask, (0, len(tokens[0])), value=1)
        return _call(self.model, self.cache, tokens[0], positions[0], keep, self.mask)[None]

    def take_back(self, counts: list[int]) -> None:
        """Forget the last `counts[0]` tokens read (one row: the eager cache cannot drop per row)."""
        drop_newest(self.cache, counts[0])
        if self.mask is not None and counts[0] > 0:
            self.mask = self.mask[:, : self.mask.shape[1] - counts[0]]


class StaticReader:
    """The same over the static step's fixed slots (a CUDA graph per number of tokens read, on CUDA); the
    cache is copied into them and let go of. One row takes refused tokens back and writes there again; in
    a batch each row's are only freed, since the rows share the slot they write next."""

    def __init__(self, model: torch.nn.Module, cache: DynamicCache, attention_mask: torch.Tensor | None,
                 room: int) -> None:
        self.step = StaticStep(model, cache, attention_mask, room, consume=True)
        self.device = model.device

    def read(self, tokens: list[list[int]], positions: list[int], keep: int) -> torch.Tensor:
        width = len(tokens[0])
        logits = self.step.read(torch.tensor(tokens, device=self.device),
                                torch.tensor(positions, device=self.device)[:, None]
                                + torch.arange(width, device=self.device))
        return logits[:, -keep:].float()

    def take_back(self, counts: list[int]) -> None:
        if len(counts) == 1:
            self.step.take_back(counts[0])
        else:
            self.step.free(counts)

    def keep_rows(self, rows: list[int]) -> None:
        """Go on with the batch rows `rows` alone (the others finished), in the slots left."""
        self.step = self.step.rows_alone(rows)


def reader(backend: str, model: torch.nn.Module, cache: DynamicCache, attention_mask: torch.Tensor | None,
           room: int, rows: int) -> EagerReader | StaticReader:
    """How a model reads during speculation: the decode backend's step (decoding.takes_static), with room
    for `room` more tokens; a batch always takes the static step, whose slots free per row."""
    if rows > 1 and (why := supports_static(model, cache)) is not None:
        raise ConfigError(f"a batch speculates through the static step, which this model cannot take ({why}); "
                          "send its requests one at a time, or without speculate")
    chosen = StaticReader if rows > 1 or takes_static(backend, model, cache) else EagerReader
    return chosen(model, cache, attention_mask, room)


FILLER = 0  # the token a row that has nothing to read feeds in a batch's call; its entry is freed after


def speculate(model: torch.nn.Module, cache: DynamicCache, first_logits: torch.Tensor, positions: list[int],
              spec: DecodeSpec, drafter: Drafter, attention_mask: torch.Tensor | None = None,
              ) -> tuple[DecodeOutput, list[SpeculationStats]]:
    """`speculate_rounds` with both models reading their few tokens per call without copying their caches."""
    with few_queries(model), few_queries(drafter.model):
        return speculate_rounds(model, cache, first_logits, positions, spec, drafter, attention_mask)


def speculate_rounds(model: torch.nn.Module, cache: DynamicCache, first_logits: torch.Tensor, positions: list[int],
                     spec: DecodeSpec, drafter: Drafter, attention_mask: torch.Tensor | None = None,
                     ) -> tuple[DecodeOutput, list[SpeculationStats]]:
    """A batch's decode with a draft, its rows in step: each round the draft proposes up to
    `drafter.proposals` tokens per row from its own cache, and the target reads each row's last token and
    its proposals in one call and keeps what `check_guess` keeps (greedy: the agreeing prefix and its own
    next token, so exactly its greedy tokens; sampling: speculative sampling, so exactly its
    distribution). Each row advances by its own count; refused proposals leave both caches again. A
    finished row feeds fillers whose entries are freed, until half the rows are finished: then both
    models go on with the running rows alone (`spec.compact`). `positions`: each row's logical position
    of its next token; `attention_mask`: [B, cache length] where the cache has slots a row hides (padding)."""
    batch = len(positions)
    rows = [RowOutput(spec.tokenizer, spec.max_new_tokens[r], spec.eos_token_ids[r], (spec.stops or [()] * batch)[r],
                      logprobs=spec.logprobs is not None and spec.logprobs[r] is not None) for r in range(batch)]
    wanted = [spec.logprobs[r] if spec.logprobs is not None else None for r in range(batch)]
    given = spec.accepted or [None] * batch
    made = make_generators(spec.samplings, first_logits.device)
    generators = [g.generator if g is not None and g.generator is not None else made[r] for r, g in enumerate(given)]
    stats = [SpeculationStats() for _ in range(batch)]
    longest = max(spec.max_new_tokens)
    # One row writes again where refused tokens were; a batch's rows share the next slot, so every call
    # takes new ones.
    room = longest + drafter.proposals + 1 if batch == 1 else (longest + 1) * (drafter.proposals + 1)
    target = reader(spec.backend, model, cache, attention_mask, room, batch)
    draft = None  # the draft's reader, made when it first proposes
    live = list(range(batch))  # the rows both readers hold, in their order
    chosen, logprobs = [], []
    for r in range(batch):
        if given[r] is not None:  # a checked guess: its tokens but the last are in the target's cache already
            chosen.append(given[r].token_ids)
            logprobs.append(given[r].logprobs)
        else:
            chosen.append(check_guess([], first_logits[r:r + 1].float(), spec.samplings[r], generators[r]))
            logprobs.append(token_logprobs(first_logits[r:r + 1], chosen[r], [wanted[r]])
                            if wanted[r] is not None else None)
    first_token_at = time.perf_counter()
    answers: list[list[int]] = [[] for _ in range(batch)]  # every token each row has chosen so far
    target_at = [p + len(c) - 1 for p, c in zip(positions, chosen, strict=True)]  # each row's last chosen token
    read = list(drafter.read)  # answer tokens the draft has read, per row
    steps = 0
    vocab = first_logits.shape[-1]
    while True:
        for r in live:
            row = rows[r]
            if row.finish is not None:
                continue
            for token, logprob in zip(chosen[r], logprobs[r] or [None] * len(chosen[r]), strict=True):
                if row.finish is not None:
                    break
                if spec.cancelled is not None and spec.cancelled(r):
                    row.end("cancelled")
                    break
                row.take(token, logprob)
            answers[r] += chosen[r]
            if spec.on_text is not None and (piece := row.new_text()):
                spec.on_text(r, piece)
        running = [r for r in live if rows[r].finish is None]
        if not running:
            break
        if spec.compact and len(running) <= len(live) // 2:
            kept_rows = [live.index(r) for r in running]
            target.keep_rows(kept_rows)
            if draft is not None:
                draft.keep_rows(kept_rows)
            live = running
        on = [rows[r].finish is None for r in live]  # a finished row still held feeds fillers
        # Each row proposes what it would alone: its own width, at most the tokens it has left, so a
        # sampled row draws the same random numbers whatever its neighbours ask.
        left = {r: rows[r].max_new_tokens - len(rows[r].token_ids) - 1 for r in running}
        chosen_width = drafter.proposals if drafter.auto is None else \
            drafter.auto.proposals(drafter.proposals, max(left.values()), filled=drafter.fill is None)
        widths = drafter.widths or [None] * batch
        counts = {r: min(widths[r] if widths[r] is not None else chosen_width, left[r]) for r in running}
        count = max(counts.values())
        if count and draft is None:
            if drafter.fill is not None:  # the draft reads the prompt only once a proposal is wanted
                drafter.fill()
                drafter.fill = None
            for r, held in enumerate(drafter.row_bytes or [kv_bytes(drafter.cache)]):
                stats[r].draft_kv_bytes = held
            if len(live) < batch:
                drafter.cache = select_rows(drafter.cache, torch.tensor(live, device=first_logits.device), 0, trim=True)
            unread = max(len(answers[r]) - read[r] for r in live)
            # A batch's draft reads through the static step even once one row is left: its padded cache
            # needs the step's per-row masks.
            draft = reader(spec.backend, drafter.model, drafter.cache, None,
                           room + unread + (longest + 1) * (len(live) > 1), batch)
        started = time.perf_counter()
        proposed: list[list[int]] = [[] for _ in range(batch)]
        guess_probs: list[list[torch.Tensor]] = [[] for _ in range(batch)]
        if count:
            # The draft reads what it has not read yet of each answer: one row all at once, a batch a token
            # per call (a row with nothing left feeds a filler). The last token read gives the first proposal.
            feeds = [answers[r][read[r]:] if going else [] for r, going in zip(live, on, strict=True)]
            if len(live) == 1:
                logits = draft.read(feeds, [drafter.positions[live[0]] + read[live[0]]], 1)[:, -1]
                read[live[0]] += len(feeds[0])
            else:  # right-aligned, so every row reads its last token in the last call
                calls = max(len(feed) for feed in feeds)
                for call in range(calls):
                    fed = [call >= calls - len(feed) for feed in feeds]
                    tokens = [[feed[call - calls + len(feed)]] if feeding else [FILLER]
                              for feed, feeding in zip(feeds, fed, strict=True)]
                    logits = draft.read(tokens, [drafter.positions[r] + read[r] for r in live], 1)[:, -1]
                    draft.take_back([0 if feeding else 1 for feeding in fed])
                    for r, feeding in zip(live, fed, strict=True):
                        read[r] += feeding
            for step in range(count):
                for at, r in enumerate(live):
                    if not on[at] or step >= counts[r]:
                        continue
                    # The draft proposes among the target's tokens only (a vocabulary padded differently).
                    row_logits = logits[at, :vocab] if logits.shape[-1] >= vocab else \
                        F.pad(logits[at], (0, vocab - logits.shape[-1]), value=float("-inf"))
                    if spec.samplings[r].greedy:
                        token = int(row_logits.argmax())
                    else:
                        probs = sampling_probs(row_logits, spec.samplings[r])
                        token = int(torch.multinomial(probs, 1, generator=generators[r]))
                        guess_probs[r].append(probs)
                    proposed[r].append(token)
                if step + 1 == count:
                    break  # the last proposal is not read (it may be refused)
                reading = [going and step + 1 < counts[r] for r, going in zip(live, on, strict=True)]
                tokens = [[proposed[r][-1]] if going else [FILLER] for r, going in zip(live, reading, strict=True)]
                logits = draft.read(tokens, [drafter.positions[r] + read[r] for r in live], 1)[:, -1]
                draft.take_back([0 if going else 1 for going in reading])
                for r, going in zip(live, reading, strict=True):
                    read[r] += going
        draft_seconds = time.perf_counter() - started
        tokens = [[answers[r][-1], *proposed[r], *[FILLER] * (count - len(proposed[r]))] if going
                  else [FILLER] * (count + 1) for r, going in zip(live, on, strict=True)]
        reading = _synchronized(first_logits.device) if drafter.auto is not None else 0.0
        logits = target.read(tokens, [target_at[r] for r in live], count + 1)
        if drafter.auto is not None:
            drafter.auto.timed(count + 1, _synchronized(first_logits.device) - reading, count, draft_seconds)
        steps += 1
        refused_by_target, refused_by_draft = [], []
        for at, r in enumerate(live):
            if not on[at]:
                refused_by_target.append(count + 1)
                refused_by_draft.append(0)
                continue
            sampled = torch.stack(guess_probs[r]) if guess_probs[r] else None
            own = counts[r]
            chosen[r] = check_guess(proposed[r], logits[at, : own + 1], spec.samplings[r], generators[r], sampled)
            kept = len(chosen[r]) - 1
            stats[r].rounds += own > 0
            stats[r].proposed += own
            stats[r].accepted += kept
            stats[r].draft_seconds += draft_seconds / sum(on)
            if drafter.auto is not None and own:
                drafter.auto.device.checked(own, kept)
            logprobs[r] = token_logprobs(logits[at, : len(chosen[r])], chosen[r], [wanted[r]] * len(chosen[r])) \
                if wanted[r] is not None else None
            refused_by_target.append(count - kept)  # the target read the last token, the proposals and fillers
            # The draft read the answer and every proposal but the last: keep what the target kept.
            refused_by_draft.append(max(own - 1, 0) - min(kept, max(own - 1, 0)))
            target_at[r] += kept + 1
        target.take_back(refused_by_target)
        if draft is not None:
            draft.take_back(refused_by_draft)
        for r, refused in zip(live, refused_by_draft, strict=True):
            read[r] -= refused
    decoded = [Decoded(row.token_ids, row.shown, row.finish or "length", row.logprobs) for row in rows]
    return DecodeOutput(decoded, first_token_at, steps), stats
