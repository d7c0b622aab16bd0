"""The one request flow (ARCHITECTURE.md), batched:

  tokenize with the chat template
  -> draft pass (if the method asks): draft prefill + lookahead tokens
  -> [station 1] prompt stage (prompt-compression methods; none yet)
  -> target prefill (+ the lookahead tokens as a probe), capturing window-query importance
  -> [station 2] KV stage: keep a subset of KV entries per layer and head
  -> decode from the compressed cache at the original positions
  -> results with stats

Requests of different lengths run as one left-padded batch. Methods never see padding: they
get each row's own scores and return positions in that row's prompt.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from .attention import WindowCollector, capture
from .cache import bytes_per_entry, drop_tail, gather_positions
from .decoding import TextCallback, decode
from .errors import ConfigError, PromptError
from .methods import Method, WindowKVMethod, get_method
from .prompt import EncodedPrompt, encode_prompt
from .types import Request, Result, Sampling, Stats

if TYPE_CHECKING:
    from .models import ModelPair


@dataclass
class PaddedBatch:
    """Prompts left-padded to one length N; row b's prompt occupies columns pads[b]..N-1."""

    input_ids: torch.Tensor  # [B, N]
    attention_mask: torch.Tensor | None  # [B, N]; None when no row is padded
    position_ids: torch.Tensor  # [B, N]
    lengths: list[int]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def pad(self, row: int) -> int:
        return self.width - self.lengths[row]


@dataclass
class DraftView:
    """What the draft pass hands on: its guess of the answer, per row."""

    lookahead_ids: torch.Tensor  # [B, L] (padded after a row's own end)
    lookahead_valid: torch.Tensor  # [B, L] bool
    lengths: list[int]


@dataclass
class Clock:
    """Stage timings in seconds (synchronising CUDA so the numbers mean something)."""

    device: torch.device
    stages: dict[str, float] = field(default_factory=dict)

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


def pad_prompts(prompts: list[EncodedPrompt], pad_id: int, device: torch.device) -> PaddedBatch:
    lengths = [len(p.ids) for p in prompts]
    width = max(lengths)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt.ids):] = torch.tensor(prompt.ids)
        mask[row, width - len(prompt.ids):] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    padded = min(lengths) < width
    return PaddedBatch(ids.to(device), mask.to(device) if padded else None, positions.to(device), lengths)


def eos_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    ids = {ids} if isinstance(ids, int) else set(ids or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def check_context(model: torch.nn.Module, role: str, prompt_length: int, extra_tokens: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and prompt_length + extra_tokens > limit:
        raise PromptError(
            f"the prompt has {prompt_length} tokens and {extra_tokens} more are asked for, past the {role}'s "
            f"context limit of {limit} tokens; shorten the context or ask for fewer new tokens"
        )


def run_draft(model: torch.nn.Module, batch: PaddedBatch, lookahead: list[int], eos: set[int],
              pad_id: int, clock: Clock) -> DraftView:
    """Draft prefill + greedy lookahead; the draft's own cache is discarded afterwards."""
    started = clock.now()
    cache = DynamicCache(config=model.config)
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    prefilled = clock.now()
    clock.add("draft_prefill", prefilled - started)
    decoded = decode(
        model, cache, out.logits[:, -1], positions=torch.tensor(batch.lengths, device=batch.input_ids.device),
        attention_mask=batch.attention_mask, max_new_tokens=lookahead,
        samplings=[Sampling()] * len(lookahead), eos_token_ids=eos,
    )
    clock.add("draft_lookahead", clock.now() - prefilled)
    lengths = [len(row.token_ids) for row in decoded.rows]
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    valid = torch.zeros((len(lengths), width), dtype=torch.bool)
    for row, decoded_row in enumerate(decoded.rows):
        ids[row, : lengths[row]] = torch.tensor(decoded_row.token_ids, dtype=torch.long)
        valid[row, : lengths[row]] = True
    device = batch.input_ids.device
    return DraftView(ids.to(device), valid.to(device), lengths)


def target_prefill(model: torch.nn.Module, batch: PaddedBatch, method: Method, draft: DraftView | None,
                   score: bool, clock: Clock) -> tuple[DynamicCache, torch.Tensor, list[torch.Tensor] | None]:
    """Prefill the prompt (then the draft's lookahead as a probe) and capture window importance.

    The prompt is run alone first, so its KV entries are exactly dense prefill's; the probe's
    entries are dropped again. Returns the cache, the last prompt position's logits and, when
    scoring, per layer [B, H_kv, N - window] scores.
    """
    collector = None
    if score:
        assert isinstance(method, WindowKVMethod)
        collector = WindowCollector(batch.width - method.window, method.reduction)
        collector.score_last(method.window)
    cache = DynamicCache(config=model.config)
    started = clock.now()
    with capture(model, collector):
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    position_ids=batch.position_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        prefilled = clock.now()
        prompt_scoring = collector.seconds if collector is not None else 0.0
        clock.add("target_prefill", prefilled - started - prompt_scoring)
        if collector is not None and draft is not None and draft.lookahead_ids.shape[1] > 0:
            collector.score_last(draft.lookahead_ids.shape[1], draft.lookahead_valid)
            width = draft.lookahead_ids.shape[1]
            mask = None
            if batch.attention_mask is not None:
                mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch.lengths), width)], 1)
            positions = torch.tensor(batch.lengths, device=cache.layers[0].keys.device)[:, None] + torch.arange(
                width, device=cache.layers[0].keys.device)
            model(input_ids=draft.lookahead_ids, attention_mask=mask, position_ids=positions,
                  past_key_values=cache, use_cache=True, logits_to_keep=1)
            drop_tail(cache, batch.width)
            clock.add("probe", clock.now() - prefilled - (collector.seconds - prompt_scoring))
    if collector is not None:
        clock.add("scoring", collector.seconds)
    return cache, out.logits[:, -1], collector.layer_scores() if collector is not None else None


def select_kv(method: WindowKVMethod, scores: list[torch.Tensor], batch: PaddedBatch, budgets: list[int | None],
              ) -> tuple[list[torch.Tensor], torch.Tensor | None, list[list[torch.Tensor] | None]]:
    """Station 2 for every row; returns the gather index per layer [B, H_kv, K], the new mask and
    each row's kept positions (row coordinates; None for rows kept whole)."""
    kept_rows: list[list[torch.Tensor] | None] = []
    for row, budget in enumerate(budgets):
        n = batch.lengths[row]
        if budget is None or budget >= n:
            kept_rows.append(None)
            continue
        pad = batch.pad(row)
        kept_rows.append(method.keep_positions([s[row, :, pad:].float() for s in scores], n, budget))
    counts = [len(kept[0][0]) if kept is not None else batch.lengths[row] for row, kept in enumerate(kept_rows)]
    width = max(counts)
    num_kv_heads = scores[0].shape[1]
    index = [torch.zeros(len(budgets), num_kv_heads, width, dtype=torch.long) for _ in scores]
    for row, kept in enumerate(kept_rows):
        pad, start = batch.pad(row), width - counts[row]
        for layer in range(len(scores)):
            columns = kept[layer] + pad if kept is not None else torch.arange(pad, batch.width).expand(num_kv_heads, -1)
            index[layer][row, :, start:] = columns
    mask = None
    if min(counts) < width:
        mask = torch.zeros(len(budgets), width, dtype=torch.long)
        for row, count in enumerate(counts):
            mask[row, width - count:] = 1
    return index, mask, kept_rows


def peak_memory(device: torch.device) -> int:
    """CUDA: bytes allocated at the peak of this request. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024


@dataclass
class Prepared:
    """A batch after both stations: the (compressed) target cache, ready to decode."""

    method: Method
    requests: list[Request]
    lengths: list[int]
    budgets: list[int | None]
    cache: DynamicCache
    first_logits: torch.Tensor  # [B, V], the last prompt position's logits
    attention_mask: torch.Tensor | None  # [B, physical cache length]; None when no row is padded
    kept_rows: list[list[torch.Tensor] | None]  # per row, per layer [H_kv, kept] prompt positions
    layer_scores: list[torch.Tensor] | None  # per layer [B, H_kv, N - window] window importance (padded columns)
    draft: DraftView | None
    entry_bytes: int
    clock: Clock
    started: float


@torch.inference_mode()
def prepare_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense",
                  **method_params) -> Prepared:
    """Everything before decoding: tokenize, draft pass, both stations, compressed target cache."""
    method = get_method(method, **method_params)
    target, tokenizer = pair.target.model, pair.tokenizer
    device = target.device
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = clock.now()

    prompts = [encode_prompt(tokenizer, request) for request in requests]
    lengths = [len(p.ids) for p in prompts]
    for request, n in zip(requests, lengths, strict=True):
        check_context(target, "target", n, request.max_new_tokens)
    budgets = [method.kv_budget(n) for n in lengths]
    compress = [b is not None and b < n for b, n in zip(budgets, lengths, strict=True)]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batch = pad_prompts(prompts, pad_id, device)
    clock.add("tokenize", clock.now() - started)

    # Draft pass, only when some row will be compressed (a dense run needs no guess).
    lookahead = [method.draft_lookahead(r.max_new_tokens) if c else 0 for r, c in zip(requests, compress, strict=True)]
    draft = None
    if any(compress) and max(lookahead) > 0:
        if pair.draft is None:
            raise ConfigError(f"method {method.name!r} needs a draft model; load the pair with a draft")
        for n, extra in zip(lengths, lookahead, strict=True):
            check_context(pair.draft.model, "draft", n, extra)
        draft = run_draft(pair.draft.model, batch, lookahead, eos_ids(pair.draft.model, tokenizer), pad_id, clock)

    # Station 1, the prompt stage, is empty for every method so far: the target sees the whole prompt.

    cache, first_logits, scores = target_prefill(target, batch, method, draft, any(compress), clock)

    # Station 2: the KV stage.
    attention_mask = batch.attention_mask
    kept_rows: list[list[torch.Tensor] | None] = [None] * len(requests)
    entry_bytes = bytes_per_entry(cache)
    if any(compress):
        selecting = clock.now()
        assert isinstance(method, WindowKVMethod) and scores is not None
        index, attention_mask, kept_rows = select_kv(method, scores, batch, budgets)
        gather_positions(cache, index)
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        clock.add("compression", clock.now() - selecting)
    return Prepared(method, requests, lengths, budgets, cache, first_logits, attention_mask, kept_rows, scores,
                    draft, entry_bytes, clock, started)


@torch.inference_mode()
def generate_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense",
                   on_text: TextCallback | None = None, **method_params) -> list[Result]:
    """Run requests through the flow as one batch; results equal running them one by one.

    Stage timings in each result's stats are the batch's (the stages run once for all rows).
    """
    if not requests:
        return []
    prepared = prepare_batch(pair, requests, method, **method_params)
    target, clock, lengths = pair.target.model, prepared.clock, prepared.lengths
    decoding = clock.now()
    output = decode(
        target, prepared.cache, prepared.first_logits, positions=torch.tensor(lengths, device=target.device),
        attention_mask=prepared.attention_mask, max_new_tokens=[r.max_new_tokens for r in requests],
        samplings=[r.sampling for r in requests], eos_token_ids=eos_ids(target, pair.tokenizer),
        tokenizer=pair.tokenizer, stops=[r.stop for r in requests], on_text=on_text,
    )
    finished = clock.now()
    clock.add("decode", finished - max(decoding, output.first_token_at))
    memory = peak_memory(target.device)

    results = []
    for row, decoded in enumerate(output.rows):
        n, kept, budget = lengths[row], prepared.kept_rows[row], prepared.budgets[row]
        entries = kept[0].shape[-1] if kept is not None else n
        note = f"budget {budget} >= prompt length {n}: ran dense" if budget is not None and kept is None else ""
        stats = Stats(
            method=prepared.method.name, prompt_tokens=n, kept_prompt_tokens=n, kv_entries=entries,
            kv_bytes_dense=n * prepared.entry_bytes, kv_bytes=entries * prepared.entry_bytes,
            compressed=kept is not None,
            lookahead_tokens=prepared.draft.lengths[row] if prepared.draft is not None else 0,
            new_tokens=len(decoded.token_ids), time_to_first_token=output.first_token_at - prepared.started,
            total_time=finished - prepared.started, timings=dict(clock.stages), peak_memory_bytes=memory,
            note=note,
        )
        results.append(Result(decoded.text, decoded.token_ids, decoded.finish_reason, stats, kept))
    return results


def generate(pair: ModelPair, context: str = "", question: str = "", *, method: str | Method = "dense",
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: tuple[str, ...] | list[str] = (), system: str | None = None,
             messages: list[dict[str, str]] | None = None, chat_template: bool = True,
             on_text: Callable[[str], None] | None = None, **method_params) -> Result:
    """Answer one request; `method_params` are the method's own parameters (budget, window, ...)."""
    request = Request(context=context, question=question, messages=messages, system=system,
                      max_new_tokens=max_new_tokens, sampling=Sampling(temperature, top_p, top_k, seed),
                      stop=tuple(stop), chat_template=chat_template)
    stream = (lambda _row, text: on_text(text)) if on_text is not None else None
    return generate_batch(pair, [request], method, on_text=stream, **method_params)[0]
