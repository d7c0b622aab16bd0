"""Turn a request into prompt tokens, remembering where the question starts and where each token's
text lies (so kept tokens can be turned back into text for another engine or tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import PromptError
from .types import Request


@dataclass
class EncodedPrompt:
    ids: list[int]
    question_start: int  # index of the first token of the question (len(ids) if there is none)
    text: str = ""  # the rendered prompt (chat template included)
    offsets: list[tuple[int, int]] | None = None  # character span of each token in `text`
    content: tuple[int, int] = (0, 0)  # character span of the user's content (context + question) in `text`
    templated: bool = False  # rendered with the tokenizer's chat template

    def content_tokens(self) -> tuple[int, int]:
        """The tokens [start, end) that hold the user's content, the chat template's head and tail cut off;
        the whole prompt where the tokenizer gives no offsets."""
        begin, end = self.content
        if self.offsets is None or end <= begin:
            return 0, len(self.ids)
        start = next((i for i, (_, stop) in enumerate(self.offsets) if stop > begin), len(self.ids))
        stop = next((i + 1 for i in range(len(self.offsets) - 1, -1, -1) if self.offsets[i][0] < end), 0)
        return start, max(stop, start)


def kept_text(prompt: EncodedPrompt, positions: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The kept tokens' text within the user content, and its spans (character offsets in the content)."""
    if prompt.offsets is None:
        raise PromptError("mapping kept tokens back to text needs a fast tokenizer (with offsets)")
    begin, end = prompt.content
    spans: list[tuple[int, int]] = []
    for position in positions:
        start, stop = max(prompt.offsets[position][0], begin), min(prompt.offsets[position][1], end)
        if stop <= start:
            continue  # a template token, outside the user's content
        if spans and start <= spans[-1][1]:
            spans[-1] = (spans[-1][0], max(stop, spans[-1][1]))
        else:
            spans.append((start, stop))
    return "".join(prompt.text[a:b] for a, b in spans), [(a - begin, b - begin) for a, b in spans]


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
    return encode_prompts(tokenizer, [request])[0]


def encode_prompts(tokenizer, requests: list[Request]) -> list[EncodedPrompt]:
    """`encode_prompt` for a batch, in one tokenizer call: a fast tokenizer encodes the texts on all cores.
    A request's `prompt_ids` are its prompt as they are."""
    if any(request.prompt_ids is not None for request in requests):
        texts = [r for r in requests if r.prompt_ids is None]
        encoded = iter(encode_prompts(tokenizer, texts) if texts else [])
        return [next(encoded) if r.prompt_ids is None else from_ids(tokenizer, list(r.prompt_ids)) for r in requests]
    rendered = [_render(tokenizer, request) for request in requests]
    encoded: list[dict] = [{} for _ in requests]
    for add_special_tokens in (False, True):
        rows = [row for row, r in enumerate(rendered) if r[1] == add_special_tokens]
        if rows:
            batch = tokenizer([rendered[row][0] for row in rows], add_special_tokens=add_special_tokens,
                              return_offsets_mapping=tokenizer.is_fast)
            for index, row in enumerate(rows):
                encoded[row] = {key: values[index] for key, values in batch.items()}
    return [_encoded_prompt(tokenizer, *r, e) for r, e in zip(rendered, encoded, strict=True)]


def from_ids(tokenizer, ids: list[int]) -> EncodedPrompt:
    """A prompt given as token ids: no question is marked (it all is context), the text is their decoding."""
    if max(ids) >= len(tokenizer):
        raise PromptError(f"prompt_ids holds token id {max(ids)}, past the tokenizer's {len(tokenizer)} tokens")
    return EncodedPrompt(ids, len(ids), tokenizer.decode(ids))


def _render(tokenizer, request: Request) -> tuple[str, bool, str, str]:
    """The prompt text, whether the tokenizer must add its special tokens, the question and the content."""
    messages, question = user_turn(request)
    if request.chat_template and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        add_special_tokens = False  # the template already wrote them
    else:
        text = "\n\n".join(str(m.get("content", "")) for m in messages)
        add_special_tokens = True
    if request.answer_prefix:
        text += request.answer_prefix if text.endswith("\n") else "\n" + request.answer_prefix
    return text, add_special_tokens, question, str(messages[-1].get("content", ""))


def template_tail(tokenizer) -> str:
    """What the tokenizer's chat template writes after a user's content, the assistant's header included
    ("\n" for a tokenizer without one)."""
    if not getattr(tokenizer, "chat_template", None):
        return "\n"
    mark = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True)
    return text[text.rindex(mark) + 1:]


def _encoded_prompt(tokenizer, text: str, add_special_tokens: bool, question: str, content: str,
                    encoded: dict) -> EncodedPrompt:
    question_char = text.rfind(question) if question else -1
    content_start = max(text.rfind(content), 0)
    ids = list(encoded["input_ids"])
    offsets = [tuple(span) for span in encoded["offset_mapping"]] if tokenizer.is_fast else None
    question_start = len(ids)
    if question_char >= 0 and offsets is not None:
        question_start = next((i for i, (_, end) in enumerate(offsets) if end > question_char), len(ids))
    elif question_char >= 0:
        prefix = tokenizer(text[:question_char], add_special_tokens=add_special_tokens)["input_ids"]
        question_start = min(len(prefix), len(ids))
    return EncodedPrompt(ids, question_start, text, offsets, (content_start, content_start + len(content)),
                         templated=not add_special_tokens)
