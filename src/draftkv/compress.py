"""Prompt compression without generation, for use with any other engine.

The draft reads the prompt and a prompt method keeps a subset of its tokens. The result is the kept
text of the user's content (send it to a remote server or another engine, which applies its own chat
template) and the kept token ids of the whole templated prompt (for an engine that takes ids).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

from .api import check_pair, compress_batch
from .errors import ConfigError
from .flow import LayerKinds, Observer
from .methods import Method, get_method, names
from .prompt import kept_text
from .types import Request

if TYPE_CHECKING:
    from .models import ModelPair


@dataclass
class CompressedPrompt:
    text: str  # the kept text of the user's content (context and question)
    token_ids: list[int]  # the kept tokens of the whole templated prompt
    kept_positions: list[int]  # their positions in the full prompt (empty when the draft's tokenizer differs)
    spans: list[tuple[int, int]]  # kept character spans of the user's content (none for a prompt of token ids)
    prompt_tokens: int
    method: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kept_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def ratio(self) -> float:
        return self.kept_tokens / self.prompt_tokens

    @property
    def origin_tokens(self) -> int:
        """LLMLingua's name for the prompt's tokens."""
        return self.prompt_tokens

    @property
    def compressed_tokens(self) -> int:
        """LLMLingua's name for the kept tokens."""
        return self.kept_tokens

    def to_dict(self) -> dict:
        return {**asdict(self), "kept_tokens": self.kept_tokens, "ratio": self.ratio,
                "origin_tokens": self.origin_tokens, "compressed_tokens": self.compressed_tokens}

    def summary(self) -> str:
        return (f"[{self.method}] kept {self.kept_tokens} of {self.prompt_tokens} prompt tokens ({self.ratio:.1%}) "
                f"in {len(self.spans)} spans of the content")


def prompt_methods() -> list[str]:
    return names("prompt")


def check_prompt_method(method: Method) -> None:
    if not method.compresses_prompt:
        raise ConfigError(f"method {method.name!r} does not compress prompts; use one of: {', '.join(prompt_methods())}")


def compress_prompt(pair: ModelPair, context: str = "", question: str = "", *, method: str | Method = "specpc",
                    messages: list[dict[str, str]] | None = None, system: str | None = None,
                    chat_template: bool = True, max_new_tokens: int = 128, **method_params) -> CompressedPrompt:
    """Keep the prompt tokens a prompt method keeps; no target forward pass is run."""
    request = Request(context=context, question=question, messages=messages, system=system,
                      max_new_tokens=max_new_tokens, chat_template=chat_template)
    return compress_prompts(pair, [request], method, **method_params)[0]


@torch.inference_mode()
def compress_prompts(pair: ModelPair, requests: list[Request], method: str | Method = "specpc", *,
                     observer: Observer | None = None, **method_params) -> list[CompressedPrompt]:
    """`compress_prompt` for a batch of requests (one draft pass for all of them); `observer` hears
    each stage start and end."""
    check_pair(pair)
    chosen = get_method(method, **method_params)
    check_prompt_method(chosen)
    if len(requests) > 1 and pair.draft is not None and LayerKinds.of(pair.draft.model.config).sliding:
        # A sliding window's left padding would differ from the full layers': one request at a time.
        return [compress_prompts(pair, [request], chosen, observer=observer)[0] for request in requests]
    stage = compress_batch(pair, requests, chosen, observer=observer)
    results = []
    for row, prompt in enumerate(stage.prompts):
        kept = stage.kept.kept_tokens[row]
        positions = kept.tolist() if kept is not None else list(range(len(prompt.ids)))
        if stage.kept.kept_texts[row] is not None:  # another tokenizer: the target re-tokenised the kept text
            (text, spans), positions = stage.kept.kept_texts[row], []
        elif requests[row].prompt_ids is not None:  # a prompt of token ids has no characters to point at
            text = pair.tokenizer.decode([prompt.ids[p] for p in positions], clean_up_tokenization_spaces=False)
            spans = []
        else:
            text, spans = kept_text(prompt, positions)
        target_ids = stage.batch.input_ids[row, stage.batch.pad(row):].tolist()
        results.append(CompressedPrompt(text=text, token_ids=target_ids, kept_positions=positions, spans=spans,
                                        prompt_tokens=len(prompt.ids), method=chosen.name,
                                        timings=dict(stage.clock.stages)))
    return results
