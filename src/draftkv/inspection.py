"""See what was kept: one request read by several methods (one draft pass and one target prefill for all,
through the executor), and for each what its scorer thought of every prompt token, what it kept, its
guess, its answer and its stats; written as one self-contained HTML page (`draftkv inspect`)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError
from .methods import get_method
from .prompt import encode_prompt
from .types import Request

if TYPE_CHECKING:
    import torch

    from .flow import Prepared
    from .methods import Method
    from .models import ModelPair
    from .prompt import EncodedPrompt
    from .types import Result


@dataclass
class MethodView:
    """One method's reading of the prompt: per token, its scorer's importance (0-1, None where it scores
    nothing) and the share of it that was kept (a prompt token: 0 or 1; a KV entry: the share of the
    compressed layers' heads that kept it), with its answer and stats."""

    label: str
    importance: list[float] | None
    kept_share: list[float]
    kept: float  # what the stats count as kept: prompt tokens read, or KV entries per layer and head
    kept_unit: str
    answer: str
    guess: str | None
    accepted: str  # the answer's first tokens that the target's check took from the guess
    stats: dict[str, Any] = field(default_factory=dict)
    layer_entries: list[float] | None = None  # KV entries kept per head in each compressed layer (the allocation)


@dataclass
class Inspection:
    """The prompt's tokens (as the target reads them, chat template included) and every method's view."""

    tokens: list[str]
    question_start: int
    question: str
    views: list[MethodView]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Inspection:
        """An inspection from `to_dict()`'s form (the server's `inspect` block, a `--json` line)."""
        return cls(data["tokens"], data["question_start"], data["question"],
                   [MethodView(**view) for view in data["views"]])

    @classmethod
    def of_result(cls, pair: ModelPair, request: Request, method: Method, result: Result) -> Inspection:
        """What one finished request kept of each prompt token (its scorer's importance is not kept with a
        result: see `inspect` for that)."""
        prompt = encode_prompt(pair.tokenizer, request)
        return cls(prompt_tokens(pair, prompt), prompt.question_start, request.question or "",
                   [view_of(method, pair, result, None, len(prompt.ids))])

    def to_html(self) -> str:
        """One page with everything inline (no network): opens from a file. The data goes in as JSON with
        every character that HTML reads inside a script (<, >, &, and the line separators) escaped, so no
        text of the prompt can end the script or comment it out; the page sets its title from the data."""
        page = resources.files("draftkv").joinpath("inspect.html").read_text(encoding="utf-8")
        data = json.dumps(self.to_dict(), separators=(",", ":"))
        for character in "<>&\u2028\u2029":
            data = data.replace(character, f"\\u{ord(character):04x}")
        before, _, after = page.partition("__DATA__")
        return before + data + after

    def write(self, path: str | Path) -> Path:
        """Write the page whole or not at all: it goes to a file beside `path`, renamed into place once written."""
        path = Path(path)
        partial = path.with_name(f".{path.name}.partial")
        try:
            partial.write_text(self.to_html(), encoding="utf-8")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return path


def inspect(pair: ModelPair, context: str, question: str, methods: list[str | Method], *, max_new_tokens: int = 64,
            system: str | None = None, chat_template: bool = True, answer_prefix: str = "") -> Inspection:
    """Read one request with every method in `methods` (names at their default budgets, or Method objects)
    through one executor pass, and collect what each kept and why. The answers are greedy; `answer_prefix`
    starts the assistant's turn (as RULER's prompts do)."""
    from .flow import finish, prepare_each

    if not methods:
        raise ConfigError("inspect needs at least one method to show, e.g. ['dense', 'speckv']")
    chosen = [get_method(method) for method in methods]
    request = Request(context=context, question=question, system=system, max_new_tokens=max_new_tokens,
                      chat_template=chat_template, answer_prefix=answer_prefix)
    prompt = encode_prompt(pair.tokenizer, request)
    tokens = prompt_tokens(pair, prompt)
    views: list[MethodView | None] = [None] * len(chosen)
    for index, prepared in prepare_each(pair, [request], chosen, prompts=[prompt]):
        importance = token_importance(prepared, len(prompt.ids))  # before decoding: it may reuse the buffers
        result = finish(pair, prepared)[0]
        views[index] = view_of(chosen[index], pair, result, importance, len(prompt.ids))
    return Inspection(tokens, prompt.question_start, question, views)


def prompt_tokens(pair: ModelPair, prompt: EncodedPrompt) -> list[str]:
    """Each prompt token's text (its span of the rendered prompt, when the tokenizer gives offsets)."""
    if prompt.offsets is not None:
        return [prompt.text[start:end] for start, end in prompt.offsets]
    return pair.tokenizer.batch_decode([[token] for token in prompt.ids])


def token_importance(prepared: Prepared, length: int) -> list[float] | None:
    """What the method's scorers said of each prompt token, scaled to 0-1: the draft's token scores for a
    prompt stage; for a KV stage, each layer's and head's scores over its maximum, averaged (the window,
    which is always kept, counts as 1). A method that scores both shows its KV scores where it read the
    token, else its prompt scores. None for a method that decides by position alone."""
    import torch

    importance = None
    draft = prepared.draft
    if prepared.method.compresses_prompt and draft is not None and draft.token_scores is not None:
        scores = draft.token_scores[0, draft.token_scores.shape[1] - length:].float()
        importance = scaled(scores).cpu()
    target = prepared.target
    if target is None or not prepared.consumer.drops_entries or not target.layer_scores:
        return importance.tolist() if importance is not None else None
    read = prepared.batch.lengths[0]  # the prompt the target read (the kept tokens of a prompt stage)
    pad = prepared.batch.width - read
    heads = scaled(torch.cat([layer[0, :, pad:].float() for layer in target.layer_scores]))  # [layers x H, columns]
    read_importance = torch.ones(read)
    read_importance[: heads.shape[1]] = heads.mean(dim=0).cpu()
    kept_tokens = prepared.kept.kept_tokens[0]
    if kept_tokens is None:
        return read_importance.tolist()
    combined = importance.clone() if importance is not None else torch.zeros(length)
    combined[kept_tokens.cpu()] = read_importance
    return combined.tolist()


def scaled(scores: torch.Tensor) -> torch.Tensor:
    """Each row of scores (the last dimension) over its maximum. A token with no score (the first token's
    self-information is undefined) counts as unimportant."""
    import torch

    scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0).clamp(min=0)
    return scores / scores.amax(dim=-1, keepdim=True).clamp(min=1e-12)


def view_of(method: Method, pair: ModelPair, result: Result, importance: list[float] | None,
            length: int) -> MethodView:
    import torch

    share = torch.ones(length)
    if result.kept_tokens is not None:
        share = torch.zeros(length)
        share[result.kept_tokens] = 1.0
    layer_entries = None
    if result.kept_positions is not None:
        counts = torch.zeros(length)
        slots = 0
        for layer in result.kept_positions:
            positions = layer[layer >= 0]
            counts += torch.bincount(positions.flatten().cpu(), minlength=length)[:length].float()
            slots += layer.shape[0]
        share = counts / slots
        layer_entries = [round(int((layer >= 0).sum()) / layer.shape[0], 1) for layer in result.kept_positions]
    stats = result.stats
    kv = result.kept_positions is not None
    accepted_ids = result.token_ids[: stats.accepted_guess_tokens]
    return MethodView(
        label=label_of(method), importance=[round(v, 4) for v in importance] if importance is not None else None,
        kept_share=[round(v, 4) for v in share.tolist()],
        kept=stats.kv_entries if kv else stats.kept_prompt_tokens,
        kept_unit="KV entries per layer and head" if kv else "prompt tokens read",
        answer=result.text, guess=result.guess,
        accepted=pair.tokenizer.decode(accepted_ids, clean_up_tokenization_spaces=False) if accepted_ids else "",
        stats=stats.to_dict(), layer_entries=layer_entries)


def label_of(method: Method) -> str:
    budgets = [f"{name}={value}" for name, value in method.params().items() if name in ("budget", "prompt_budget")]
    return f"{method.name} ({', '.join(budgets)})" if budgets else method.name
