"""Our own decode loop: explicit logical positions over a (possibly compressed) cache.

Greedy or sampled (temperature, top-k, top-p, a seed per request), stops on EOS and on stop
strings, and streams text deltas through a callback. Each row has its own generator, so a
batch samples exactly what its requests would sample one by one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from .types import FinishReason, Sampling

TextCallback = Callable[[int, str], None]  # (row in the batch, new text)

# cuDNN attention (PyTorch's first choice on Hopper GPUs) builds an execution plan for every new
# shape, and every decode step brings a new key length: on an H100, steps at a key length not seen
# before took ~120 ms instead of ~20 (results/bench-gpu/README.md). The other kernels need no plans.
DECODE_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


@dataclass
class Decoded:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason


@dataclass
class DecodeOutput:
    rows: list[Decoded]
    first_token_at: float  # time.perf_counter() when the first tokens were picked
    steps: int  # forward passes run


def pick_tokens(logits: torch.Tensor, samplings: list[Sampling], generators: list[torch.Generator | None]) -> list[int]:
    """Next token per row from logits [B, V]."""
    if all(s.greedy for s in samplings):
        return logits.argmax(dim=-1).tolist()
    tokens = []
    for row, (sampling, generator) in enumerate(zip(samplings, generators, strict=True)):
        if sampling.greedy:
            tokens.append(int(logits[row].argmax()))
            continue
        scores = logits[row].float() / sampling.temperature
        if sampling.top_k:
            kth_best = torch.topk(scores, min(sampling.top_k, scores.numel())).values[-1]
            scores = scores.masked_fill(scores < kth_best, float("-inf"))
        if sampling.top_p < 1:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
            # Drop a token when the tokens before it already reach top_p (the best one always stays).
            drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= sampling.top_p
            scores = scores.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        tokens.append(int(torch.multinomial(probs, 1, generator=generator)))
    return tokens


def make_generators(samplings: list[Sampling], device: torch.device) -> list[torch.Generator | None]:
    generators: list[torch.Generator | None] = []
    for sampling in samplings:
        if sampling.greedy or sampling.seed is None:
            generators.append(None)
        else:
            generator = torch.Generator(device=device)
            generator.manual_seed(sampling.seed)
            generators.append(generator)
    return generators


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not safe to stream yet: a partial character or stop string."""
    if text.endswith("\ufffd"):
        return 1
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                longest = max(longest, size)
                break
    return longest


def decode(
    model: torch.nn.Module,
    cache: DynamicCache,
    first_logits: torch.Tensor,
    *,
    positions: torch.Tensor,
    attention_mask: torch.Tensor | None,
    max_new_tokens: list[int],
    samplings: list[Sampling],
    eos_token_ids: set[int] | list[set[int]],
    tokenizer=None,
    stops: list[tuple[str, ...]] | None = None,
    on_text: TextCallback | None = None,
    after_step: Callable[[DynamicCache], None] | None = None,
    cancelled: Callable[[int], bool] | None = None,
) -> DecodeOutput:
    """Generate from `first_logits` [B, V] (the prefill's last position) and a filled `cache`.

    positions: [B] logical position of the next token per row. eos_token_ids: one set for every row
    or a set per row. attention_mask: [B, physical
    cache length] (None when no row has padding). Without a tokenizer, text is left empty (the
    draft's lookahead only needs ids). `after_step` sees the cache after every forward pass
    (decode-time eviction cuts it there). A row for which `cancelled(row)` turns true stops at the
    next token with finish reason "cancelled" (a server's client went away or ran out of time).
    """
    batch = first_logits.shape[0]
    device = first_logits.device
    row_eos = eos_token_ids if isinstance(eos_token_ids, list) else [eos_token_ids] * batch
    stops = stops or [() for _ in range(batch)]
    generators = make_generators(samplings, device)
    token_ids: list[list[int]] = [[] for _ in range(batch)]
    texts = ["" for _ in range(batch)]
    streamed = [0] * batch
    finish: list[FinishReason | None] = ["length" if limit == 0 else None for limit in max_new_tokens]
    logits = first_logits
    positions = positions.clone()
    first_token_at = 0.0
    steps = 0

    for step in range(max(max_new_tokens)):
        next_tokens = pick_tokens(logits, samplings, generators)
        if step == 0:
            first_token_at = time.perf_counter()
        for row, token in enumerate(next_tokens):
            if finish[row] is None and cancelled is not None and cancelled(row):
                finish[row] = "cancelled"
            if finish[row] is not None:
                continue
            if token in row_eos[row]:
                finish[row] = "stop"
            else:
                token_ids[row].append(token)
                if tokenizer is not None:
                    text = tokenizer.decode(token_ids[row], skip_special_tokens=True)
                    hits = [text.index(stop) for stop in stops[row] if stop in text]
                    if hits:
                        text, finish[row] = text[: min(hits)], "stop"
                    texts[row] = text
                if finish[row] is None and len(token_ids[row]) >= max_new_tokens[row]:
                    finish[row] = "length"
            if on_text is not None:
                # Hold back a partial character or the start of a stop string until it is settled.
                safe = len(texts[row]) if finish[row] else len(texts[row]) - _held_back(texts[row], stops[row])
                if safe > streamed[row]:
                    on_text(row, texts[row][streamed[row] : safe])
                    streamed[row] = safe
        if all(reason is not None for reason in finish):
            break
        # Finished rows are fed a token too (the batch moves together); their output is ignored.
        feed = torch.tensor(next_tokens, device=device).view(batch, 1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        with torch.inference_mode(), sdpa_kernel(DECODE_ATTENTION):
            out = model(input_ids=feed, position_ids=positions.view(batch, 1), attention_mask=attention_mask,
                        cache=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        positions += 1
        steps += 1
        if after_step is not None:
            after_step(cache)

    rows = [Decoded(ids, text, reason or "length") for ids, text, reason in zip(token_ids, texts, finish, strict=True)]
    return DecodeOutput(rows=rows, first_token_at=first_token_at, steps=steps)
