"""Query-agnostic compression: compress a context once, before any question is known, then ask
several questions against the same compressed cache.

The prompt is split where the question would start: the context part (system prompt, template,
context) is compressed with no question in the window; each question, with the template's tail, is
then read on top of the compressed cache, answered, and removed again (question and answer) before
the next one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from .api import check_pair
from .engine.attention import ragged_attention
from .engine.cache import checkpoint
from .engine.decoding import decode
from .errors import ConfigError, PromptError
from .flow import Prepared, answer_spec, check_fits, guessed, prepare_each, row_stats
from .methods import Method, get_method
from .prompt import EncodedPrompt, user_turn
from .types import Request, Result, Sampling, Stats, check_text

if TYPE_CHECKING:
    from .models import ModelPair

_QUESTION_MARK = "\x00"  # stands where the question will go while the template is rendered


def split_template(tokenizer, context: str, system: str | None, chat_template: bool) -> tuple[str, str]:
    """The rendered prompt up to where the question goes, and the template text after the question."""
    messages, _ = user_turn(Request(context=context, question=_QUESTION_MARK, system=system))
    if chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages)
    at = text.rindex(_QUESTION_MARK)
    return text[:at], text[at + 1:]


@dataclass
class CompressedContext:
    """A context compressed once; `ask` answers questions against it."""

    pair: ModelPair
    prepared: Prepared
    tail: str  # the template text after the question
    context_tokens: int
    stats: Stats  # what the compression kept and cost

    @torch.inference_mode()
    def ask(self, question: str, *, max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0,
            top_k: int = 0, seed: int | None = None, stop: tuple[str, ...] | list[str] = (),
            on_text: Callable[[str], None] | None = None, answer_prefix: str = "") -> Result:
        """The answer to `question` from the compressed context; every argument is checked as `generate`
        checks it (a request of its own), and the question and its answer leave the cache as it was."""
        request = Request(question=question, max_new_tokens=max_new_tokens, stop=stop, answer_prefix=answer_prefix,
                          sampling=Sampling(temperature, top_p, top_k, seed))
        if not question.strip():
            raise PromptError("the question is empty")
        if on_text is not None and not callable(on_text):
            raise ConfigError(f"on_text must be a function of the new text, got {on_text!r}")
        model, tokenizer = self.pair.target.model, self.pair.tokenizer
        cache = self.prepared.cache
        start = self.prepared.batch.next_positions[0]
        tail = self.tail + (answer_prefix if not answer_prefix or self.tail.endswith("\n") else "\n" + answer_prefix)
        ids = tokenizer(question + tail, add_special_tokens=False)["input_ids"]
        check_fits(model.config, "target", start + len(ids), max_new_tokens)
        started = time.perf_counter()
        restore = checkpoint(cache)
        try:
            with ragged_attention(model, cache):
                out = model(input_ids=torch.tensor([ids], device=model.device),
                            position_ids=torch.arange(start, start + len(ids), device=model.device)[None],
                            cache=cache, use_cache=True, logits_to_keep=1)
                read = time.perf_counter()
                stream = (lambda _row, text: on_text(text)) if on_text is not None else None
                spec = answer_spec(self.pair, [request], [None], on_text=stream, consume=False)
                decoded = decode(model, cache, out.logits[:, -1], torch.tensor([start + len(ids)], device=model.device),
                                 None, spec)
        finally:
            restore()  # the question and its answer go again: the next question starts clean
        finished = time.perf_counter()
        row = decoded.rows[0]
        # What the compression kept (self.stats), with this question's tokens and times.
        stats = replace(
            self.stats, prompt_tokens=self.context_tokens + len(ids),
            kept_prompt_tokens=self.stats.kept_prompt_tokens + len(ids),
            new_tokens=len(row.token_ids), time_to_first_token=decoded.first_token_at - started,
            total_time=finished - started,
            timings={"question_prefill": read - started, "decode": finished - decoded.first_token_at},
            note="; ".join(filter(None, [self.stats.note, "query-agnostic: the context was compressed before the "
                                                          "question was known"])),
        )
        return Result(row.text, row.token_ids, row.finish_reason, stats, guess=guessed(self.pair, self.prepared, 0))


def compress_context(pair: ModelPair, context: str, *, method: str | Method = "snapkv", system: str | None = None,
                     chat_template: bool = True, max_new_tokens: int = 128, **method_params) -> CompressedContext:
    """Compress `context` before any question is known (the window holds the end of the context)."""
    chosen = get_method(method, **method_params)
    return next(compress_context_each(pair, context, [chosen], system=system, chat_template=chat_template,
                                      max_new_tokens=max_new_tokens))[1]


@torch.inference_mode()
def compress_context_each(pair: ModelPair, context: str, methods: list[str | Method], *, system: str | None = None,
                          chat_template: bool = True, max_new_tokens: int = 128,
                          ) -> Iterator[tuple[int, CompressedContext]]:
    """`compress_context` for several methods over one context, through the executor: one draft pass and
    one target prefill for all that read the whole context, exactly what each gives alone. Yields (method
    index, its compressed context) as each is ready; ask one's questions before taking the next (the
    last takes the shared cache itself)."""
    check_pair(pair)
    check_text("context", context)
    if pair.tokenizer_mismatch is not None:
        raise ConfigError("query-agnostic compression needs a draft with the target's tokenizer")
    if not context.strip():
        raise PromptError("the context is empty")
    tokenizer = pair.tokenizer
    head, tail = split_template(tokenizer, context, system, chat_template)
    templated = bool(chat_template and getattr(tokenizer, "chat_template", None))
    encoded = tokenizer(head, add_special_tokens=not templated, return_offsets_mapping=tokenizer.is_fast)
    ids = encoded["input_ids"]
    offsets = [tuple(span) for span in encoded["offset_mapping"]] if tokenizer.is_fast else None
    prompt = EncodedPrompt(ids, len(ids), head, offsets, (max(head.rfind(context), 0), len(head)), templated)
    request = Request(context=context, max_new_tokens=max_new_tokens, chat_template=chat_template)
    for index, prepared in prepare_each(pair, [request], methods, prompts=[prompt], answers=False):
        stats, _, _ = row_stats(prepared, 0, new_tokens=0, first_token_at=prepared.started,
                                finished=prepared.clock.now(), memory=None)
        yield index, CompressedContext(pair, prepared, tail, len(ids), stats)
