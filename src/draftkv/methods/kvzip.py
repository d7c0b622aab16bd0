"""KVzip: query-agnostic KV dropping by context reconstruction (arXiv 2505.23416).

After its prefill the target reads a reconstruction probe against the prompt's cache: a repeat
instruction followed by the prompt itself, chunk by chunk (so the probe's queries never meet all of
the prompt's at once). An entry's importance is the most attention any of the repeated tokens' queries
(over the query heads of its group) gives it: an entry the model needs to say the context again is
one it needs to answer about it, whatever the question. The probe's entries are dropped again; the
last `window` entries and the first `sink` are always kept. The cost is a second read of the prompt
by the target, shown as the `reconstruction` stage of the stats' timings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError
from .base import SinkKVMethod, check_int, param
from .scorers import TargetReading

if TYPE_CHECKING:
    import torch

    from ..engine.attention import WindowCollector


@dataclass(frozen=True)
class Reconstruction:
    """The reconstruction probe's attention over the first `width - window` prompt columns."""

    window: int
    instruction: str
    chunk: int
    reduction: str

    def collector(self, width: int) -> None:
        return None

    def scores(self, collected: WindowCollector | None, reading: TargetReading) -> list[torch.Tensor]:
        from ..engine.attention import WindowCollector

        batch = reading.batch
        instruction = reading.tokenizer(self.instruction, add_special_tokens=False)["input_ids"]
        collector = WindowCollector(batch.width - self.window, self.reduction)
        rows = [batch.input_ids[row, batch.pad(row):].tolist() for row in range(len(batch.lengths))]
        for start in range(0, max(batch.lengths), self.chunk):
            pieces = [ids[start: start + self.chunk] for ids in rows]
            reading.probe([instruction + piece for piece in pieces],
                          [[False] * len(instruction) + [True] * len(piece) for piece in pieces],
                          collector, "reconstruction")
        return collector.layer_scores()


@dataclass(frozen=True)
class KVzip(SinkKVMethod):
    name: ClassVar[str] = "kvzip"
    summary: ClassVar[str] = "KV dropping by context reconstruction: the target's attention while repeating the prompt (query-agnostic)."

    reduction: str = param("max", "over query heads of a group and the repeated tokens: max (KVzip) or mean")
    chunk: int = param(2048, "prompt tokens repeated per probe call (the paper's 2K)")
    instruction: str = param("\n\nRepeat the previous context exactly.\n", "text read before the repeated prompt")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("chunk", self.chunk, 1)
        if not isinstance(self.instruction, str):
            raise ConfigError(f"instruction must be a string, got {self.instruction!r}")

    def kv_scorer(self) -> Reconstruction:
        return Reconstruction(self.window, self.instruction, self.chunk, self.reduction)
