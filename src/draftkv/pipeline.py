"""The one request flow (ARCHITECTURE.md), batched:

  tokenize with the chat template
  -> draft pass (if the method asks): draft prefill + lookahead tokens
  -> [station 1] prompt stage: keep a subset of prompt tokens
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

from .attention import Collector, PromptCollector, RowSlot, WindowCollector, capture, ragged_attention
from .cache import bytes_per_entry, drop_last, gather_positions, gathered_copy, kv_bytes, ragged_cache
from .decoding import TextCallback, decode
from .errors import ConfigError, PromptError, TokenizerMismatchError
from .eviction import DecodeEviction
from .methods import Dense, DraftScoring, KVMethod, Method, PromptMethod, SpecKVPC, WindowKVMethod, get_method
from .prompt import EncodedPrompt, encode_prompt, encode_prompts, kept_text, user_turn
from .types import Request, Result, Sampling, Stats

if TYPE_CHECKING:
    from .models import ModelPair


@dataclass
class PaddedBatch:
    """Prompts left-padded to one length N; row b's prompt occupies columns pad(b)..N-1."""

    input_ids: torch.Tensor  # [B, N]
    attention_mask: torch.Tensor | None  # [B, N]; None when no row is padded
    position_ids: torch.Tensor  # [B, N]
    lengths: list[int]  # tokens per row
    next_positions: list[int]  # position of the first generated token per row

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]

    def pad(self, row: int) -> int:
        return self.width - self.lengths[row]


@dataclass
class DraftView:
    """What the draft pass hands on: its guess of the answer and its prompt-token scores, per row."""

    lookahead_ids: torch.Tensor  # [B, L] (padded after a row's own end)
    lookahead_valid: torch.Tensor  # [B, L] bool
    lengths: list[int]
    token_scores: torch.Tensor | None = None  # [B, N] per prompt column, for the prompt stage


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

    def add_all(self, stages: dict[str, float]) -> None:
        for stage, seconds in stages.items():
            self.add(stage, seconds)


def pad_prompts(rows: list[list[int]], pad_id: int, device: torch.device,
                positions: list[list[int]] | None = None, next_positions: list[int] | None = None) -> PaddedBatch:
    """Left-pad token rows; positions default to 0..len-1 (kept tokens may keep their original ones)."""
    lengths = [len(ids) for ids in rows]
    width = max(lengths)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for row, tokens in enumerate(rows):
        ids[row, width - len(tokens):] = torch.tensor(tokens, dtype=torch.long)
        mask[row, width - len(tokens):] = 1
        row_positions = positions[row] if positions is not None else range(len(tokens))
        position_ids[row, width - len(tokens):] = torch.tensor(list(row_positions), dtype=torch.long)
    padded = min(lengths) < width
    return PaddedBatch(ids.to(device), mask.to(device) if padded else None, position_ids.to(device), lengths,
                       next_positions or lengths)


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


# Logits per LM-head chunk: 2**24 floats is 64 MiB, a fraction of a long prompt's prefill peak.
_LM_HEAD_CHUNK = 2**24


def self_information(model: torch.nn.Module, hidden: torch.Tensor, batch: PaddedBatch) -> torch.Tensor:
    """-log p(token | prefix) of every prompt column under the draft [B, N], from its last hidden
    states [B, N, d]; a row's first token gets inf.

    The LM head runs in chunks of positions, so the [N, vocabulary] logits never exist at once, and
    -log p is logsumexp - logit, so no second [chunk, vocabulary] tensor (log_softmax's) is made.
    """
    head = model.get_output_embeddings()
    batch_size, width = batch.input_ids.shape
    scores = torch.zeros(batch_size, width, device=hidden.device)
    chunk = max(1, _LM_HEAD_CHUNK // (batch_size * head.weight.shape[0]))
    for start in range(0, width - 1, chunk):
        stop = min(start + chunk, width - 1)
        logits = head(hidden[:, start:stop]).float()
        next_logits = logits.gather(-1, batch.input_ids[:, start + 1: stop + 1, None])[..., 0]
        scores[:, start + 1: stop + 1] = torch.logsumexp(logits, dim=-1) - next_logits
    for row in range(batch_size):
        scores[row, batch.width - batch.lengths[row]] = float("inf")  # nothing predicts the first token
    return scores


def left_padded(rows: list[torch.Tensor], dim: int) -> torch.Tensor:
    """One-row tensors [1, ..., n_b, ...] stacked into [B, ..., max n_b, ...], zeros before each row's own."""
    width = max(row.shape[dim] for row in rows)
    shape = list(rows[0].shape)
    shape[0], shape[dim] = len(rows), width
    stacked = rows[0].new_zeros(shape)
    for index, row in enumerate(rows):
        stacked[index: index + 1].narrow(dim, width - row.shape[dim], row.shape[dim]).copy_(row)
    return stacked


def prefill(model: torch.nn.Module, batch: PaddedBatch, cache: DynamicCache | None,
            collectors: list[Collector]) -> torch.Tensor:
    """The model reads the prompts (into `cache` when given); returns the last position's logits [B, V].

    A padded batch is read one row at a time, each without its padding: attention over left-padded rows
    needs a [B, 1, N, N] mask, which rules out the fused flash kernel and is gigabytes by itself at
    32k tokens (H100, dense, batch 8 at 32k: 10.9 s and a 36.6 GB peak, row by row 3.9 s and 9.2 GB).
    Each row's cache goes into `cache` left-padded with zeros (the decode mask hides them), and each
    collector puts the row's scores at the row's own columns."""
    if batch.attention_mask is None:
        out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, past_key_values=cache,
                    use_cache=cache is not None, logits_to_keep=1)
        return out.logits[:, -1]
    logits, row_layers = [], []
    for row in range(len(batch.lengths)):
        pad = batch.pad(row)
        row_cache = DynamicCache(config=model.config) if cache is not None else None
        for collector in collectors:
            collector.slot = RowSlot(row, pad, len(batch.lengths))
        try:
            out = model(input_ids=batch.input_ids[row:row + 1, pad:], position_ids=batch.position_ids[row:row + 1, pad:],
                        past_key_values=row_cache, use_cache=row_cache is not None, logits_to_keep=1)
        finally:
            for collector in collectors:
                collector.slot = None
        logits.append(out.logits[:, -1])
        if row_cache is not None:
            row_layers.append([(layer.keys, layer.values) for layer in row_cache.layers])
        del out, row_cache
    if cache is not None:
        for index in range(len(row_layers[0])):
            keys = left_padded([layers[index][0] for layers in row_layers], dim=2)
            values = left_padded([layers[index][1] for layers in row_layers], dim=2)
            for layers in row_layers:  # the rows' copies go as each layer's batch copy is made
                layers[index] = None
            cache.update(keys, values, index)
    return torch.cat(logits)


@dataclass(frozen=True)
class DraftNeed:
    """What one method asks of the draft pass: a guess of the answer (per row), prompt scores, or both."""

    lookahead: list[int]
    scoring: DraftScoring | None = None
    information: bool = False  # the self-information of every prompt token (LLMLingua-style)

    @property
    def needed(self) -> bool:
        return max(self.lookahead, default=0) > 0 or self.scoring is not None or self.information


@dataclass
class Budgets:
    """Per row: what station 1 keeps of the prompt, and what station 2 keeps of what is left."""

    prompt: list[int | None]
    compress_prompt: list[bool]
    kv: list[int | None]
    compressing: list[bool]  # either station drops something

    @classmethod
    def of(cls, method: Method, lengths: list[int]) -> Budgets:
        prompt = [method.prompt_tokens(n) for n in lengths]
        compress_prompt = [b is not None and b < n for b, n in zip(prompt, lengths, strict=True)]
        # The KV stage runs on what station 1 leaves, which is exactly its budget.
        stage_lengths = [b if c else n for b, c, n in zip(prompt, compress_prompt, lengths, strict=True)]
        kv = [method.kv_entries(n) for n in stage_lengths]
        compress_kv = [b is not None and b < n for b, n in zip(kv, stage_lengths, strict=True)]
        return cls(prompt, compress_prompt, kv, [p or k for p, k in zip(compress_prompt, compress_kv, strict=True)])

    def draft_need(self, method: Method, max_new_tokens: list[int]) -> DraftNeed:
        """Nothing for rows kept whole (a dense run needs no guess); prompt scores when station 1 drops tokens."""
        lookahead = [method.draft_lookahead(m) if c else 0 for m, c in zip(max_new_tokens, self.compressing, strict=True)]
        drops = any(self.compress_prompt)
        return DraftNeed(lookahead, method.draft_scoring() if drops else None, method.needs_self_information and drops)


def run_draft(model: torch.nn.Module, batch: PaddedBatch, needs: list[DraftNeed], eos: set[int], pad_id: int,
              clock: Clock) -> list[DraftView]:
    """One draft prefill + greedy lookahead (its own cache is discarded afterwards) serving every need.

    The lookahead runs as long as the longest need asks, and each need gets the first tokens of it
    (greedy decoding is causal, so exactly what a shorter run gives) with the prompt scores of its
    own collector, which counts only the steps of its own lookahead."""
    device = batch.input_ids.device
    started = clock.now()
    layers = model.config.num_hidden_layers
    collectors = []
    for need in needs:
        scoring = need.scoring
        if scoring is not None and scoring.start_layer >= layers:
            raise ConfigError(f"start_layer is {scoring.start_layer} but the draft has {layers} layers; "
                              f"give a start_layer below {layers}")
        collectors.append(None if scoring is None else PromptCollector(
            batch.width, scoring.window, scoring.start_layer, scoring.weighted, scoring.head_reduction,
            scoring.layer_reduction))
    active = [c for c in collectors if c is not None]
    # When the lookahead scores the prompt, each lookahead token must be fed too: one step more.
    steps = [max(length + 1 if need.scoring is not None and length > 0 else length
                 for need in needs for length in [need.lookahead[row]]) for row in range(len(batch.lengths))]
    hidden: list[torch.Tensor] = []
    keep_hidden = None
    if any(need.information for need in needs):  # the decoder's last hidden states, before the LM head's slice
        keep_hidden = model.get_decoder().register_forward_hook(
            lambda _module, _args, output: hidden.append(output.last_hidden_state))
    # Without lookahead steps (LLMLingua-style alone) the draft needs no cache of its own.
    cache = DynamicCache(config=model.config) if max(steps) > 0 else None

    def scoring_seconds() -> float:
        return sum(c.seconds for c in active)

    with capture(model, *active):
        try:
            last_logits = prefill(model, batch, cache, active)
        finally:
            if keep_hidden is not None:
                keep_hidden.remove()
        prefilled = clock.now()
        prefill_scoring = scoring_seconds()
        clock.add("draft_prefill", prefilled - started - prefill_scoring)
        decoded = decode(
            model, cache, last_logits, positions=torch.tensor(batch.next_positions, device=device),
            attention_mask=batch.attention_mask, max_new_tokens=steps,
            samplings=[Sampling()] * len(steps), eos_token_ids=eos,
        )
    del cache
    clock.add("draft_lookahead", clock.now() - prefilled - (scoring_seconds() - prefill_scoring))
    scoring_started = clock.now()
    information = self_information(model, left_padded(hidden, dim=1), batch) if hidden else None
    views = []
    for need, collector in zip(needs, collectors, strict=True):
        view = lookahead_view([row.token_ids[:length] for row, length in zip(decoded.rows, need.lookahead, strict=True)],
                              pad_id, device)
        if collector is not None:
            # Step 0 is the prefill's window; step t feeds lookahead token t.
            step_valid = torch.cat([torch.ones(len(steps), 1, dtype=torch.bool, device=device), view.lookahead_valid], 1)
            view.token_scores = collector.token_scores(step_valid, need.scoring.step_reduction)
        elif need.information:
            view.token_scores = information
        views.append(view)
    if active or information is not None:
        clock.add("draft_scoring", clock.now() - scoring_started + scoring_seconds())
    return views


def kv_collector(method: Method, batch: PaddedBatch) -> WindowCollector | None:
    """The collector for the KV stage's scores: the window queries, or all prompt queries (H2O)."""
    if not isinstance(method, WindowKVMethod):
        return None
    collector = WindowCollector(batch.width - method.window, method.reduction)
    collector.score_last(batch.width if method.score_queries == "all" else method.window)
    return collector


def target_prefill(model: torch.nn.Module, batch: PaddedBatch, collectors: list[WindowCollector | None],
                   clock: Clock) -> tuple[DynamicCache, torch.Tensor]:
    """Prefill the prompt alone (so its KV entries are exactly dense prefill's) while the collectors
    score it; returns the cache and the last prompt position's logits."""
    cache = DynamicCache(config=model.config)
    started = clock.now()
    before = sum(c.seconds for c in collectors if c is not None)
    with capture(model, *collectors):
        last_logits = prefill(model, batch, cache, [c for c in collectors if c is not None])
    scoring = sum(c.seconds for c in collectors if c is not None) - before
    clock.add("target_prefill", clock.now() - started - scoring)
    clock.add("scoring", scoring)
    return cache, last_logits


def probe(model: torch.nn.Module, cache: DynamicCache, batch: PaddedBatch, guess: DraftView,
          scorers: list[tuple[WindowCollector, torch.Tensor]], clock: Clock) -> None:
    """Read a guessed answer after the prompt so its queries score the prompt, then drop its entries.

    scorers: each collector with the guess tokens it counts ([B, L] bool); causal attention makes a
    shorter guess exactly the first tokens of a longer one."""
    width = guess.lookahead_ids.shape[1]
    for collector, valid in scorers:
        collector.score_last(width, valid)
    mask = None
    if batch.attention_mask is not None:
        mask = torch.cat([batch.attention_mask, batch.attention_mask.new_ones(len(batch.lengths), width)], 1)
    device = cache.layers[0].keys.device
    positions = torch.tensor(batch.next_positions, device=device)[:, None] + torch.arange(width, device=device)
    collectors = [collector for collector, _ in scorers]
    started, before = clock.now(), sum(c.seconds for c in collectors)
    with capture(model, *collectors):
        model(input_ids=guess.lookahead_ids, attention_mask=mask, position_ids=positions,
              past_key_values=cache, use_cache=True, logits_to_keep=1)
    drop_last(cache, width)
    scoring = sum(c.seconds for c in collectors) - before
    clock.add("probe", clock.now() - started - scoring)
    clock.add("scoring", scoring)


def pseudo_answer(model: torch.nn.Module, cache: DynamicCache, first_logits: torch.Tensor, batch: PaddedBatch,
                  stage_one: KVMethod, scores: list[torch.Tensor], budgets: list[int | None], tokens: int,
                  eos: set[int], pad_id: int, clock: Clock) -> DraftView:
    """LAQ++'s guess: the target itself answers a few tokens from a stage-one compressed copy of its cache."""
    started = clock.now()
    index, valid, _ = select_kv(stage_one, scores, batch, budgets)
    compressed = gathered_copy(cache, index)
    _, mask = row_mask(valid)  # stage one (SnapKV) is uniform per row
    mask = mask.to(first_logits.device) if mask is not None else None
    decoded = decode(model, compressed, first_logits, positions=torch.tensor(batch.next_positions, device=first_logits.device),
                     attention_mask=mask, max_new_tokens=[tokens if b is not None and b < n else 0
                                                          for b, n in zip(budgets, batch.lengths, strict=True)],
                     samplings=[Sampling()] * len(budgets), eos_token_ids=eos)
    clock.add("pseudo_answer", clock.now() - started)
    return lookahead_view([row.token_ids for row in decoded.rows], pad_id, first_logits.device)


def lookahead_view(token_ids: list[list[int]], pad_id: int, device: torch.device) -> DraftView:
    """Guessed answers of different lengths as one padded [B, L] block with a validity mask."""
    lengths = [len(ids) for ids in token_ids]
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    valid = torch.zeros((len(lengths), max(lengths)), dtype=torch.bool)
    for row, row_ids in enumerate(token_ids):
        ids[row, : lengths[row]] = torch.tensor(row_ids, dtype=torch.long)
        valid[row, : lengths[row]] = True
    return DraftView(ids.to(device), valid.to(device), lengths)


def select_kv(method: KVMethod, scores: list[torch.Tensor], batch: PaddedBatch, budgets: list[int | None],
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[list[torch.Tensor] | None]]:
    """Station 2 for every row. Returns, per layer, the gather index [B, H_kv, K_l] into the padded
    cache and which of those slots hold a real entry [B, H_kv, K_l], and each row's kept positions
    (row coordinates, -1 for empty slots; None for rows kept whole).

    scores: per layer [B, H_kv, N - window] (zeros for methods that score nothing)."""
    kept_rows: list[list[torch.Tensor] | None] = []
    for row, budget in enumerate(budgets):
        n = batch.lengths[row]
        if budget is None or budget >= n:
            kept_rows.append(None)
            continue
        pad = batch.pad(row)
        kept_rows.append(method.keep_positions([s[row, :, pad:].float() for s in scores], n, budget))
    num_kv_heads = scores[0].shape[1]
    index, valid = [], []
    for layer in range(len(scores)):
        rows = [kept[layer] + batch.pad(row) if kept is not None else
                torch.arange(batch.pad(row), batch.width).expand(num_kv_heads, -1)
                for row, kept in enumerate(kept_rows)]
        width = max(r.shape[-1] for r in rows)
        layer_index = torch.zeros(len(rows), num_kv_heads, width, dtype=torch.long)
        layer_valid = torch.zeros(len(rows), num_kv_heads, width, dtype=torch.bool)
        for row, (columns, kept) in enumerate(zip(rows, kept_rows, strict=True)):
            real = kept[layer] >= 0 if kept is not None else torch.ones_like(columns, dtype=torch.bool)
            layer_index[row, :, width - columns.shape[-1]:] = columns.clamp(min=0)
            layer_valid[row, :, width - columns.shape[-1]:] = real
        index.append(layer_index)
        valid.append(layer_valid)
    return index, valid, kept_rows


def row_mask(valid: list[torch.Tensor]) -> tuple[bool, torch.Tensor | None]:
    """Whether the kept slots form one 2-D mask (same in every layer and head); and that mask
    ([B, K], None when all real). Otherwise the cache must be ragged."""
    first = valid[0][:, 0]
    uniform = all(v.shape == valid[0].shape and torch.equal(v, first[:, None].expand_as(v)) for v in valid)
    if not uniform:
        return False, None
    return True, None if bool(first.all()) else first.long()


def kv_stage(method: KVMethod, cache: DynamicCache, batch: PaddedBatch, scores: list[torch.Tensor] | None,
             budgets: list[int | None], *, copy: bool) -> tuple[DynamicCache, torch.Tensor | None,
                                                                list[list[torch.Tensor] | None]]:
    """Station 2: keep each layer's and head's entries; in place, or into a new cache when `copy`
    (so several methods can start from one prefill). Returns the cache, its row mask, the kept rows."""
    if scores is None:  # the method decides by position alone
        layer = cache.layers[0].keys
        scores = [torch.zeros(layer.shape[0], layer.shape[1], batch.width, device=layer.device)] * len(cache.layers)
    index, valid, kept_rows = select_kv(method, scores, batch, budgets)
    uniform, attention_mask = row_mask(valid)
    if not uniform:  # layers or heads keep different numbers of entries: a ragged cache, masked per head
        cache = ragged_cache(cache, index, valid, getattr(method, "layout", "per-head"))
    elif copy:
        cache = gathered_copy(cache, index)
    else:
        gather_positions(cache, index)
    if attention_mask is not None:
        attention_mask = attention_mask.to(cache.layers[0].keys.device if cache.layers[0].keys is not None
                                           else batch.input_ids.device)
    return cache, attention_mask, kept_rows


def peak_memory(device: torch.device) -> int:
    """CUDA: bytes allocated at the peak of this request. CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib if sys.platform == "darwin" else kib * 1024


@dataclass
class PromptStage:
    """A batch after the draft pass and station 1: what the target will read."""

    method: Method
    requests: list[Request]
    prompts: list[EncodedPrompt]  # the full prompts, as the target's tokenizer encodes them
    kept_tokens: list[torch.Tensor | None]  # per row, the prompt positions kept by station 1 (None: all)
    batch: PaddedBatch
    kv_budgets: list[int | None]
    draft: DraftView | None
    clock: Clock
    started: float
    # Per row, when the draft has another tokenizer: the kept text of the user's content and its
    # character spans (the target re-tokenised that text, so kept_tokens is None there).
    kept_texts: list[tuple[str, list[tuple[int, int]]] | None]


@torch.inference_mode()
def compress_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense", *,
                   prompts: list[EncodedPrompt] | None = None, drafted: Drafted | None = None,
                   **method_params) -> PromptStage:
    """Tokenize (unless `prompts` are given), run the draft when the method needs it (unless
    `drafted` brings its view from a pass shared with other methods), and keep the prompt tokens
    station 1 keeps."""
    method = get_method(method, **method_params)
    target, tokenizer = pair.target.model, pair.tokenizer
    device = target.device
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = clock.now()

    if prompts is None:
        prompts = encode_prompts(tokenizer, requests)
    lengths = [len(p.ids) for p in prompts]
    for request, n in zip(requests, lengths, strict=True):
        check_context(target, "target", n, request.max_new_tokens)
    budgets = Budgets.of(method, lengths)
    prompt_budgets, compress_prompt = budgets.prompt, budgets.compress_prompt
    pad_id = pad_token(tokenizer)
    batch = pad_prompts([p.ids for p in prompts], pad_id, device)
    clock.add("tokenize", clock.now() - started)

    need = budgets.draft_need(method, [r.max_new_tokens for r in requests])
    cross = pair.tokenizer_mismatch is not None
    draft, draft_prompts = None, prompts
    if drafted is not None:
        draft = drafted.view
        clock.add_all(drafted.stages)
    elif need.needed:
        if pair.draft is None:
            raise ConfigError(f"method {method.name!r} needs a draft model; load the pair with a draft")
        if cross and isinstance(method, KVMethod) and max(need.lookahead) > 0:
            raise TokenizerMismatchError(
                f"method {method.name!r} passes the draft's lookahead tokens to the target, which needs the same "
                f"tokenizer ({pair.tokenizer_mismatch}); prompt methods (specpc, specprefill, lingua) work across "
                "tokenizers")
        draft_tokenizer = pair.draft.tokenizer
        draft_batch = batch
        if cross:  # the draft reads the prompt in its own tokens; station 1 crosses back as text
            draft_prompts = encode_prompts(draft_tokenizer, requests)
            draft_batch = pad_prompts([p.ids for p in draft_prompts], pad_token(draft_tokenizer), device)
        for prompt, extra in zip(draft_prompts, need.lookahead, strict=True):
            check_context(pair.draft.model, "draft", len(prompt.ids), extra)
        draft = run_draft(pair.draft.model, draft_batch, [need], eos_ids(pair.draft.model, draft_tokenizer),
                          pad_token(draft_tokenizer), clock)[0]

    # Station 1: the prompt stage keeps a subset of prompt tokens.
    kept_tokens: list[torch.Tensor | None] = [None] * len(requests)
    kept_texts: list[tuple[str, list[tuple[int, int]]] | None] = [None] * len(requests)
    if any(compress_prompt):
        selecting = clock.now()
        assert isinstance(method, PromptMethod | SpecKVPC)
        original = method.positions == "original" and not cross
        rows, positions, next_positions = [], [], []
        for row, prompt in enumerate(prompts):
            ids = prompt.ids
            if compress_prompt[row]:
                source = draft_prompts[row]
                scores = None
                if draft is not None and draft.token_scores is not None:
                    scores = draft.token_scores[row, len(draft.token_scores[row]) - len(source.ids):]
                # Across tokenizers the budget is scaled to the draft's tokens; the result is close to it.
                budget = prompt_budgets[row] if not cross else round(prompt_budgets[row] * len(source.ids) / len(ids))
                kept = method.keep_tokens(source.ids, source.question_start, budget, scores)
                if cross:
                    kept_texts[row] = kept_text(source, kept.tolist())
                    messages, _ = user_turn(requests[row])
                    retold = Request(messages=[*messages[:-1], {**messages[-1], "content": kept_texts[row][0]}],
                                     chat_template=requests[row].chat_template)
                    ids = encode_prompt(tokenizer, retold).ids
                else:
                    kept_tokens[row] = kept
                    ids = [ids[p] for p in kept.tolist()]
            rows.append(ids)
            kept_positions = kept_tokens[row].tolist() if kept_tokens[row] is not None else None
            positions.append(kept_positions if original and kept_positions else list(range(len(ids))))
            next_positions.append(len(prompt.ids) if original and kept_positions else len(ids))
        batch = pad_prompts(rows, pad_id, device, positions, next_positions)
        clock.add("prompt_selection", clock.now() - selecting)
    return PromptStage(method, requests, prompts, kept_tokens, batch, budgets.kv, draft, clock, started, kept_texts)


def pad_token(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)


@dataclass
class Prepared:
    """A batch after both stations: the (compressed) target cache, ready to decode."""

    stage: PromptStage
    cache: DynamicCache
    first_logits: torch.Tensor  # [B, V], the last prompt position's logits
    attention_mask: torch.Tensor | None  # [B, physical cache length]; None when no row is padded
    kept_rows: list[list[torch.Tensor] | None]  # per row, per layer [H_kv, kept] positions in the target's prompt
    layer_scores: list[torch.Tensor] | None  # per layer [B, H_kv, N - window] window importance (padded columns)
    entry_bytes: int
    stored_bytes: int  # what the batch's cache tensors hold right after compression, padding included

    @property
    def draft(self) -> DraftView | None:
        return self.stage.draft

    @property
    def budgets(self) -> list[int | None]:
        return self.stage.kv_budgets


@torch.inference_mode()
def prepare_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense", *,
                  prompts: list[EncodedPrompt] | None = None, drafted: Drafted | None = None,
                  **method_params) -> Prepared:
    """Everything before decoding: tokenize, draft pass, both stations, compressed target cache."""
    stage = compress_batch(pair, requests, method, prompts=prompts, drafted=drafted, **method_params)
    method, batch, clock = stage.method, stage.batch, stage.clock
    compress_kv = [b is not None and b < n for b, n in zip(stage.kv_budgets, batch.lengths, strict=True)]

    target = pair.target.model
    collector = kv_collector(method, batch) if any(compress_kv) else None
    stage_one = method.stage_one() if any(compress_kv) else None
    first_collector = kv_collector(stage_one, batch) if stage_one is not None else None
    cache, first_logits = target_prefill(target, batch, [collector, first_collector], clock)
    guess = stage.draft if stage.draft is not None and stage.draft.lookahead_ids.shape[1] > 0 else None
    if stage_one is not None:  # LAQ++: the target guesses the answer itself, from a stage-one copy
        guess = pseudo_answer(target, cache, first_logits, batch, stage_one, first_collector.layer_scores(),
                              stage.kv_budgets, method.pseudo_tokens, eos_ids(target, pair.tokenizer),
                              pad_token(pair.tokenizer), clock)
    if collector is not None and guess is not None and guess.lookahead_ids.shape[1] > 0:
        probe(target, cache, batch, guess, [(collector, guess.lookahead_valid)], clock)
    scores = collector.layer_scores() if collector is not None else None

    # Station 2: the KV stage keeps a subset of KV entries per layer and head.
    attention_mask = batch.attention_mask
    kept_rows: list[list[torch.Tensor] | None] = [None] * len(requests)
    entry_bytes = bytes_per_entry(cache)
    if any(compress_kv):
        selecting = clock.now()
        assert isinstance(method, KVMethod)
        cache, attention_mask, kept_rows = kv_stage(method, cache, batch, scores, stage.kv_budgets, copy=False)
        clock.add("compression", clock.now() - selecting)
    return Prepared(stage, cache, first_logits, attention_mask, kept_rows, scores, entry_bytes, kv_bytes(cache))


def row_stats(prepared: Prepared, row: int, new_tokens: int, first_token_at: float, finished: float,
              memory: int) -> tuple[Stats, torch.Tensor | None, list[torch.Tensor] | None]:
    """One row's stats, its station-1 kept tokens and its kept KV positions (in original prompt positions)."""
    stage = prepared.stage
    n = len(stage.prompts[row].ids)
    kept_tokens, kept_kv = stage.kept_tokens[row], prepared.kept_rows[row]
    stage_length = stage.batch.lengths[row]
    if kept_kv is not None and kept_tokens is not None:
        kept_kv = [torch.where(positions >= 0, kept_tokens[positions.clamp(min=0)], -1) for positions in kept_kv]
    # Entries per layer and head: exact for uniform budgets, the mean for PyramidKV and Ada-KV.
    real = sum(int((positions >= 0).sum()) for positions in kept_kv) if kept_kv is not None else None
    slots = sum(positions.numel() // positions.shape[-1] for positions in kept_kv) if kept_kv is not None else 1
    entries = round(real / slots) if real is not None else stage_length
    budget = stage.kv_budgets[row]
    prompt_budget = stage.method.prompt_tokens(n)
    notes = []
    if prompt_budget is not None and kept_tokens is None:
        notes.append(f"prompt budget {prompt_budget} >= prompt length {n}: the whole prompt was kept")
    if budget is not None and kept_kv is None:
        notes.append(f"budget {budget} >= prompt length {stage_length}: ran dense")
    stats = Stats(
        method=stage.method.name, prompt_tokens=n, kept_prompt_tokens=stage_length, kv_entries=entries,
        kv_bytes_dense=n * prepared.entry_bytes,
        kv_bytes=real * prepared.entry_bytes // slots if real is not None else entries * prepared.entry_bytes,
        kv_bytes_stored=prepared.stored_bytes,
        compressed=kept_tokens is not None or kept_kv is not None or stage.kept_texts[row] is not None,
        lookahead_tokens=stage.draft.lengths[row] if stage.draft is not None else 0,
        new_tokens=new_tokens, time_to_first_token=first_token_at - stage.started,
        total_time=finished - stage.started, timings=dict(stage.clock.stages), peak_memory_bytes=memory,
        note="; ".join(notes),
    )
    return stats, kept_tokens, kept_kv


@torch.inference_mode()
def generate_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense",
                   on_text: TextCallback | None = None, cancelled: Callable[[int], bool] | None = None,
                   drafted: Drafted | None = None, **method_params) -> list[Result]:
    """Run requests through the flow as one batch; results equal running them one by one.

    Stage timings in each result's stats are the batch's (the stages run once for all rows).
    `on_text(row, text)` streams each row's new text; a row whose `cancelled(row)` turns true stops
    decoding at its next token. `drafted`: this method's view of a draft pass shared with others
    (see `shared_draft`), for the one request it was run on.
    """
    if not requests:
        return []
    chosen = get_method(method, **method_params)
    evicting = isinstance(chosen, KVMethod) and chosen.evict_every > 0
    if evicting and len(requests) > 1:  # each row would evict different entries: one request at a time
        return [generate_batch(pair, [request], chosen,
                               on_text=(lambda _row, text, i=i: on_text(i, text)) if on_text else None,
                               cancelled=(lambda _row, i=i: cancelled(i)) if cancelled else None)[0]
                for i, request in enumerate(requests)]
    return finish_batch(pair, prepare_batch(pair, requests, chosen, drafted=drafted), on_text, cancelled)


def finish_batch(pair: ModelPair, prepared: Prepared, on_text: TextCallback | None = None,
                 cancelled: Callable[[int], bool] | None = None) -> list[Result]:
    """Decode a prepared batch (with decode-time eviction when the method asks) and build the results."""
    chosen, requests = prepared.stage.method, prepared.stage.requests
    target, clock = pair.target.model, prepared.stage.clock
    eviction = None
    if isinstance(chosen, KVMethod) and chosen.evict_every > 0 and prepared.kept_rows[0] is not None:
        eviction = DecodeEviction(chosen, prepared.stage.kv_budgets[0])
    decoding = clock.now()
    with ragged_attention(target, prepared.cache), capture(target, eviction):
        output = decode(
            target, prepared.cache, prepared.first_logits,
            positions=torch.tensor(prepared.stage.batch.next_positions, device=target.device),
            attention_mask=prepared.attention_mask, max_new_tokens=[r.max_new_tokens for r in requests],
            samplings=[r.sampling for r in requests],
            eos_token_ids=[set() if r.ignore_eos else eos_ids(target, pair.tokenizer) for r in requests],
            tokenizer=pair.tokenizer, stops=[r.stop for r in requests], on_text=on_text,
            after_step=eviction.after_step if eviction is not None else None, cancelled=cancelled,
        )
    finished = clock.now()
    clock.add("decode", finished - max(decoding, output.first_token_at))
    memory = peak_memory(target.device)
    results = []
    for row, decoded in enumerate(output.rows):
        stats, kept_tokens, kept_kv = row_stats(prepared, row, len(decoded.token_ids), output.first_token_at,
                                                finished, memory)
        if eviction is not None:
            stats.note = "; ".join(filter(None, [stats.note, f"decode-time eviction ran {eviction.evictions} times"]))
        results.append(Result(decoded.text, decoded.token_ids, decoded.finish_reason, stats, kept_kv, kept_tokens))
    return results


@dataclass
class Drafted:
    """One method's view of a draft pass shared by several (see `shared_draft`), and the pass's stage times."""

    view: DraftView | None  # None: the method asks nothing of the draft
    stages: dict[str, float]


@torch.inference_mode()
def shared_draft(pair: ModelPair, request: Request, methods: list[str | Method]) -> list[Drafted] | None:
    """One draft pass for one request under several methods, prompt and KV methods alike: the longest
    lookahead any asks for, with each method's prompt scores captured alongside.

    Exact: each method's view equals its own pass's (see run_draft). None when there is nothing to
    share (fewer than two methods use the draft) or it cannot be shared (no draft, another tokenizer,
    a prompt past the draft's limit, a method the draft cannot serve): each method then runs its own
    pass and reports its own errors.
    """
    if pair.draft is None or pair.tokenizer_mismatch is not None:
        return None
    chosen = [get_method(m) for m in methods]
    prompt = encode_prompt(pair.tokenizer, request)
    n = len(prompt.ids)
    needs = [Budgets.of(m, [n]).draft_need(m, [request.max_new_tokens]) for m in chosen]
    users = [i for i, need in enumerate(needs) if need.needed]
    if len(users) < 2:
        return None
    try:
        check_context(pair.draft.model, "draft", n, max(needs[i].lookahead[0] for i in users))
    except PromptError:  # past the draft's limit: each method says so on its own
        return None
    device = pair.target.model.device
    clock = Clock(device)
    pad_id = pad_token(pair.tokenizer)
    batch = pad_prompts([prompt.ids], pad_id, device)
    try:
        views = run_draft(pair.draft.model, batch, [needs[i] for i in users],
                          eos_ids(pair.draft.model, pair.tokenizer), pad_id, clock)
    except ConfigError:  # a method the draft cannot serve
        return None
    shared = [Drafted(None, {}) for _ in chosen]
    for i, view in zip(users, views, strict=True):
        shared[i] = Drafted(view, clock.stages)
    return shared


@torch.inference_mode()
def generate_shared(pair: ModelPair, request: Request, methods: list[str | Method],
                    drafted: Drafted | None = None) -> list[Result]:
    """One request under several KV methods (and dense) with one target prefill and one draft pass.

    Exact, not approximate: the prompt's prefill is the same for every method, its window queries
    never see later tokens, a shorter lookahead is the first tokens of a longer greedy one, and each
    method then gathers its own copy of the cache and decodes from it. Prompt methods change what the
    target reads, so they cannot share. Each result's timings include the shared stages. `drafted`:
    a draft pass shared with more methods (see `shared_draft`), as long as the longest lookahead here.
    """
    chosen = [get_method(m) for m in methods]
    target, tokenizer = pair.target.model, pair.tokenizer
    prompt = encode_prompt(tokenizer, request)
    n = len(prompt.ids)
    for method in chosen:
        if not isinstance(method, KVMethod | Dense) or method.prompt_tokens(n) is not None:
            raise ConfigError(f"method {method.name!r} changes the prompt the target reads, so it cannot share a "
                              "prefill; run it on its own")
    clock = Clock(target.device)
    started = clock.now()
    check_context(target, "target", n, request.max_new_tokens)
    pad_id = pad_token(tokenizer)
    batch = pad_prompts([prompt.ids], pad_id, target.device)
    plans = [Budgets.of(m, [n]) for m in chosen]  # KV methods: station 2 only
    budgets = [plan.kv[0] for plan in plans]
    compress = [plan.compressing[0] for plan in plans]
    lookahead = [plan.draft_need(m, [request.max_new_tokens]).lookahead[0] for plan, m in zip(plans, chosen, strict=True)]
    clock.add("tokenize", clock.now() - started)

    draft = None
    if drafted is not None:
        draft = drafted.view
        clock.add_all(drafted.stages)
    elif max(lookahead) > 0:  # one draft pass, as long as the longest lookahead asked for
        if pair.draft is None:
            raise ConfigError("a method here needs a draft model; load the pair with a draft")
        if pair.tokenizer_mismatch is not None:
            raise TokenizerMismatchError(f"the draft's lookahead tokens need the target's tokenizer "
                                         f"({pair.tokenizer_mismatch})")
        check_context(pair.draft.model, "draft", n, max(lookahead))
        draft = run_draft(pair.draft.model, batch, [DraftNeed([max(lookahead)])], eos_ids(pair.draft.model, tokenizer),
                          pad_id, clock)[0]
    collectors = [kv_collector(m, batch) if c else None for m, c in zip(chosen, compress, strict=True)]
    stage_ones = [kv_collector(m.stage_one(), batch) if c and m.stage_one() else None
                  for m, c in zip(chosen, compress, strict=True)]
    cache, first_logits = target_prefill(target, batch, [*collectors, *stage_ones], clock)
    if draft is not None and draft.lookahead_ids.shape[1] > 0:
        steps = torch.arange(draft.lookahead_ids.shape[1], device=target.device)
        probe(target, cache, batch, draft, [(c, draft.lookahead_valid & (steps < length)) for c, length in
                                            zip(collectors, lookahead, strict=True) if c is not None and length],
              clock)
    for method, collector, stage_one, budget in zip(chosen, collectors, stage_ones, budgets, strict=True):
        if stage_one is not None:  # LAQ++: its own pseudo-answer probes the shared full cache
            guess = pseudo_answer(target, cache, first_logits, batch, method.stage_one(), stage_one.layer_scores(),
                                  [budget], method.pseudo_tokens, eos_ids(target, tokenizer), pad_id, clock)
            if guess.lookahead_ids.shape[1] > 0:
                probe(target, cache, batch, guess, [(collector, guess.lookahead_valid)], clock)
    shared = dict(clock.stages)

    results = []
    for method, collector, budget, length, compressing in zip(chosen, collectors, budgets, lookahead, compress,
                                                              strict=True):
        own = Clock(target.device, dict(shared))
        scores = collector.layer_scores() if collector is not None else None
        if compressing:
            selecting = own.now()
            method_cache, mask, kept_rows = kv_stage(method, cache, batch, scores, [budget], copy=True)
            own.add("compression", own.now() - selecting)
        else:  # dense: its own copy of the full cache
            method_cache = DynamicCache([(layer.keys.clone(), layer.values.clone()) for layer in cache.layers])
            mask, kept_rows = None, [None]
        view = None
        if draft is not None and length:
            view = DraftView(draft.lookahead_ids[:, :length], draft.lookahead_valid[:, :length],
                             [min(draft.lengths[0], length)])
        stage = PromptStage(method, [request], [prompt], [None], batch, [budget], view, own, started, [None])
        prepared = Prepared(stage, method_cache, first_logits, mask, kept_rows, scores, bytes_per_entry(cache),
                            kv_bytes(method_cache))
        result = finish_batch(pair, prepared)[0]
        result.stats.note = "; ".join(filter(None, [result.stats.note, "shared prefill"]))
        results.append(result)
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
