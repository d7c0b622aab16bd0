"""Checking a guessed answer: the target's own choice at every guessed position, read from one pass.

Greedy: keep the longest prefix of the guess that the target's greedy tokens agree with, then the
target's own token at the first disagreement (or after the whole guess). Sampling: speculative
sampling (Leviathan et al. 2023; Chen et al. 2023): a guessed token x is kept with probability
min(1, p(x) / q(x)), where p is the target's distribution and q the guesser's; at the first token
not kept, the target's token is drawn from the residual max(0, p - q), normalised; after a guess kept
whole, from p. The tokens so chosen have exactly the target's distribution. A greedy guess is
q = one-hot, so a guessed token is kept with probability p(x).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import Sampling
from .decoding import sampling_probs


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
