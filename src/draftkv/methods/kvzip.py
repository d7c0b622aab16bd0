"""KVzip: query-agnostic KV dropping by context reconstruction (arXiv 2505.23416), as its authors run it.

After its prefill the target is asked to say the context again, chunk by chunk: each probe is the
`instruction` (later chunks: the `hint` and the previous chunk's last `hint_tokens` tokens), the chat
template's end of the user turn and the assistant's header, then the chunk itself, repeated. The context
is the user's content, the template's head cut off. Each probe query's softmax runs over the first `sink`
entries, its own chunk's entries and the probe's own (causal), so a chunk's scores land on its own
columns only; an entry's importance is the most attention any probe query (over the query heads of its
group) gives it. The probe's entries are dropped again. One threshold over all layers and heads (the
`global` allocation) keeps the best; the first `sink` and the last `window` entries are always kept.
The cost is a second read of the context by the target, shown as the `reconstruction` stage of the stats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..types import check_text
from .base import SinkKVMethod, check_int, param
from .scorers import TargetReading

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Reconstruction:
    """The reconstruction probes' attention over the first `width - window` prompt columns."""

    window: int
    sink: int
    instruction: str
    hint: str
    hint_tokens: int
    chunk: int
    reduction: str

    def collector(self, width: int) -> None:
        return None

    def decode_collector(self) -> None:
        """Reconstruction reads the context, not the answer: nothing to score while decoding."""
        return None

    def probes(self, prompt_length: int, tokenizer: Any) -> list[tuple[int, int]]:
        """(instruction or hint with the template's tail, chunk) tokens of each probe, for a prompt of
        `prompt_length` tokens (its content is at most that long)."""
        from ..prompt import template_tail

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])

        tail = count(template_tail(tokenizer))
        first, later = count(self.instruction) + tail, count(self.hint) + self.hint_tokens + tail
        return [(first if start == 0 else later, min(self.chunk, prompt_length - start))
                for start in range(0, prompt_length, self.chunk)]

    def scores(self, collected: None, reading: TargetReading) -> list[torch.Tensor]:
        from ..engine.attention import SpanCollector
        from ..prompt import template_tail

        batch, tokenizer = reading.batch, reading.tokenizer
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        first, later = encode(self.instruction), encode(self.hint)
        rows = [batch.input_ids[row, batch.pad(row):].tolist() for row in range(len(batch.lengths))]
        prompts = reading.prompts
        tails = [encode(template_tail(tokenizer)) if prompts is not None and prompts[row].templated else encode("\n")
                 for row in range(len(rows))]
        spans = [prompts[row].content_tokens() if prompts is not None else (0, len(ids))
                 for row, ids in enumerate(rows)]
        chunks = [[(start, min(start + self.chunk, end)) for start in range(begin, end, self.chunk)]
                  for begin, end in spans]
        collector = SpanCollector(batch.width - self.window, [batch.pad(row) for row in range(len(rows))],
                                  self.sink, self.reduction)
        for index in range(max((len(c) for c in chunks), default=0)):
            tokens, places = [], []
            for row, (ids, row_chunks, tail) in enumerate(zip(rows, chunks, tails, strict=True)):
                if index >= len(row_chunks):
                    tokens.append([])
                    places.append(None)
                    continue
                start, end = row_chunks[index]
                asked = first if index == 0 else later + ids[max(start - self.hint_tokens, spans[row][0]): start]
                tokens.append(asked + tail + ids[start:end])
                places.append((start, end, len(tokens[-1])))
            collector.places = places
            reading.probe(tokens, [[True] * len(t) for t in tokens], collector, "reconstruction")
        return collector.layer_scores()


@dataclass(frozen=True)
class KVzip(SinkKVMethod):
    name: ClassVar[str] = "kvzip"
    summary: ClassVar[str] = "KV dropping by context reconstruction: the target's attention while repeating the prompt (query-agnostic)."

    allocation: str = param("global", "how the budget is spread over layers and KV heads (KVzip's: global, one "
                                      "threshold over all)")
    reduction: str = param("max", "over query heads of a group and the probe's queries: max (KVzip) or mean")
    chunk: int = param(2048, "context tokens repeated per probe (the paper's 2K)")
    instruction: str = param("\n\nRepeat the previous context exactly.", "what the first probe asks")
    hint: str = param("\n\nRepeat the part of the previous context exactly, starting with",
                      "what each later probe asks, followed by the previous chunk's last hint_tokens tokens")
    hint_tokens: int = param(8, "tokens of the previous chunk that start each later probe's hint")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("chunk", self.chunk, 1)
        check_int("hint_tokens", self.hint_tokens, 0)
        for name in ("instruction", "hint"):
            check_text(name, getattr(self, name))

    def kv_scorer(self) -> Reconstruction:
        return Reconstruction(self.window, self.sink, self.instruction, self.hint, self.hint_tokens, self.chunk,
                              self.reduction)

    def reading_probes(self, prompt_length: int, tokenizer: Any) -> list[tuple[int, int]]:
        return self.kv_scorer().probes(prompt_length, tokenizer)
