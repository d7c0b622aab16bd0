"""Log-likelihoods under compression: a continuation scored against the context's compressed cache.

The context is prefilled and compressed once by the method (the flow up to decoding), then each
continuation is read at its true positions over that cache, and the cache is rolled back between
continuations. One forward pass over context + continuation would score the uncompressed model
instead: that is what a wrapper of the model class measures, whatever method it names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .engine.attention import ragged_attention
from .engine.cache import checkpoint
from .flow import prepare, row_stats
from .methods import Method
from .prompt import EncodedPrompt
from .types import Request, Stats

if TYPE_CHECKING:
    from .models import ModelPair

# Positions read per forward call: [chunk, vocabulary] logits at a time, never the whole continuation's.
_LOGITS_PER_CALL = 2**24


@dataclass
class Scored:
    """A continuation's tokens under the compressed cache."""

    logprobs: list[float]  # log p(token | context, earlier continuation tokens), per token
    greedy: list[bool]  # whether each token is the argmax there
    top: list[list[tuple[int, float]]] | None = None  # per token, the likeliest (token id, log p) there

    @property
    def total(self) -> float:
        return sum(self.logprobs)

    @property
    def is_greedy(self) -> bool:
        return all(self.greedy)


@torch.inference_mode()
def score_continuations(pair: ModelPair, context_ids: list[int], continuations: list[list[int]],
                        method: str | Method = "dense", top: int = 0) -> tuple[list[Scored], Stats]:
    """Each continuation's token log-probabilities after `context_ids`, whose cache `method` compressed
    (its draft, if any, guesses an answer as long as the longest continuation less its last token, which
    is scored, never read), with the `top` likeliest tokens at each position when `top` > 0. Returns the scores and the compression's stats
    (what was kept of the context)."""
    if not context_ids:
        raise ValueError("the context needs at least one token (lm-eval passes its prefix token)")
    # The target reads every continuation token but the last, so the context and `longest - 1` tokens must
    # fit its context (lm-eval's windows fill it exactly).
    longest = max((len(c) for c in continuations), default=1)
    request = Request(context="(token ids)", chat_template=False, max_new_tokens=max(longest - 1, 1))
    prepared = prepare(pair, [request], [method], prompts=[EncodedPrompt(list(context_ids), len(context_ids))],
                       answers=False)[0]
    model, cache = pair.target.model, prepared.cache
    start = prepared.batch.next_positions[0]
    scored = []
    with ragged_attention(model, cache):
        for continuation in continuations:
            restore = checkpoint(cache)
            try:
                logits = _continuation_logits(model, cache, prepared.first_logits[0], continuation, start)
            finally:
                restore()  # the next continuation reads the same compressed context
            scored.append(_scored(logits, continuation, top))
    stats, _, _ = row_stats(prepared, 0, 0, prepared.started, prepared.started, None)
    return scored, stats


def _continuation_logits(model: torch.nn.Module, cache, first_logits: torch.Tensor, continuation: list[int],
                         start: int) -> list[torch.Tensor]:
    """The logits that predict each continuation token: the context's last position's, then those of the
    continuation's own tokens but the last, read in chunks over the cache."""
    logits = [first_logits[None].float()]
    device = first_logits.device
    chunk = max(1, _LOGITS_PER_CALL // first_logits.shape[-1])
    fed = continuation[:-1]
    for offset in range(0, len(fed), chunk):
        ids = fed[offset: offset + chunk]
        out = model(input_ids=torch.tensor([ids], device=device),
                    position_ids=torch.arange(start + offset, start + offset + len(ids), device=device)[None],
                    cache=cache, use_cache=True, logits_to_keep=0)
        logits.append(out.logits[0].float())
    return logits


def _scored(logits: list[torch.Tensor], continuation: list[int], top: int) -> Scored:
    logprobs, greedy, likeliest, at = [], [], [], 0
    for block in logits:
        tokens = torch.tensor(continuation[at: at + block.shape[0]], device=block.device)
        normaliser = torch.logsumexp(block, dim=-1)
        chosen = block.gather(-1, tokens[:, None])[:, 0]
        logprobs += (chosen - normaliser).tolist()
        greedy += (block.argmax(dim=-1) == tokens).tolist()
        if top:
            values, indices = torch.topk(block, top, dim=-1)
            likeliest += [list(zip(i, v, strict=True))
                          for i, v in zip(indices.tolist(), (values - normaliser[:, None]).tolist(), strict=True)]
        at += block.shape[0]
    return Scored(logprobs, greedy, likeliest if top else None)
