"""Turn a request into the target's prompt tokens, remembering where the question starts."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PromptError
from .types import Request


@dataclass
class EncodedPrompt:
    ids: list[int]
    question_start: int  # index of the first token of the question (len(ids) if there is none)


def user_turn(request: Request) -> tuple[list[dict[str, str]], str]:
    """Chat messages for the request and the question text at the end of the last one."""
    if request.messages:
        if not any(str(m.get("content", "")).strip() for m in request.messages):
            raise PromptError("the prompt is empty: every message has empty content")
        return list(request.messages), str(request.messages[-1].get("content", ""))
    if not request.context.strip() and not request.question.strip():
        raise PromptError("the prompt is empty: give a context, a question or chat messages")
    content = "\n\n".join(part for part in (request.context, request.question) if part)
    messages = [{"role": "system", "content": request.system}] if request.system else []
    return [*messages, {"role": "user", "content": content}], request.question


def encode_prompt(tokenizer, request: Request) -> EncodedPrompt:
    """Tokenize with the chat template (when the tokenizer has one and the request wants it)."""
    messages, question = user_turn(request)
    if request.chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        add_special_tokens = False  # the template already wrote them
    else:
        text = "\n\n".join(str(m.get("content", "")) for m in messages)
        add_special_tokens = True
    question_char = text.rfind(question) if question else -1
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=tokenizer.is_fast)
    ids = list(encoded["input_ids"])
    if question_char < 0:
        return EncodedPrompt(ids, len(ids))
    if tokenizer.is_fast:
        starts = [end for _, end in encoded["offset_mapping"]]
        question_start = next((i for i, end in enumerate(starts) if end > question_char), len(ids))
    else:
        prefix = tokenizer(text[:question_char], add_special_tokens=add_special_tokens)["input_ids"]
        question_start = min(len(prefix), len(ids))
    return EncodedPrompt(ids, question_start)
