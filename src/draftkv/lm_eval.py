"""draftkv as an lm-evaluation-harness model, registered as `draftkv` (needs `draftkv[lm-eval]`).

    draftkv lm-eval --model draftkv --model_args method=speckv,budget=256 --tasks TASK ...
    lm_eval.simple_evaluate(model=draftkv.lm_eval.DraftKVLM(method="speckv", budget=256), tasks=[...])

Every request goes through the executor, so every answer and every score is the compressed one:
`generate_until` runs the requests as batches (stop strings honoured); `loglikelihood` prefills and
compresses each context once, then reads each continuation at its true positions over that cache
(draftkv.likelihood); `loglikelihood_rolling` does the same for each of lm-eval's windows, whose
context (the tokens before it, up to `max_length`) is what the method compresses.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import replace
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models, registered before ours: it lists them lazily only while none is)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm import tqdm

from .engine.decoding import check_backend
from .errors import ConfigError
from .flow import run
from .likelihood import score_continuations
from .methods import get_method
from .models import DEFAULT_DRAFT, DEFAULT_TARGET, ModelPair, check_draft_cache, check_speculate, load_pair
from .options import check_dtype
from .prompt import EncodedPrompt
from .types import Request, Sampling


@register_model("draftkv")
class DraftKVLM(LM):
    """An lm-eval model whose every request runs with one draftkv method.

    `target` (or `pretrained`, lm-eval's usual name, which also names its output folder), `draft`: as
    for `draftkv.load_pair` (default the embedded pair; the draft is loaded only for methods that use
    it), or `pair`: a loaded ModelPair. `method` and any of its parameters
    (`budget`, `prompt_budget`, `compression_ratio`, `window`, ...). `batch_size`: requests generated
    together. `max_length`: the longest input (default the target's context). `speculate`: the draft
    proposes that many tokens per target call while generating (or `auto`: as the costs measured on the
    device say), from a cache that keeps what
    `draft_cache` says (compressed, whole or window). `dtype`: auto (the fastest the device measures),
    float32, bfloat16 or float16."""

    def __init__(self, target: str = DEFAULT_TARGET, draft: str | None = DEFAULT_DRAFT, method: str = "dense",
                 device: str | None = None, dtype: str | None = None, decode: str = "auto", speculate: int | str = 0,
                 draft_cache: str = "compressed",
                 batch_size: int | str = 1, max_length: int | None = None, max_gen_toks: int = 256,
                 pair: ModelPair | None = None, pretrained: str | None = None, **params: Any) -> None:
        super().__init__()
        if pretrained is not None:
            if target not in (DEFAULT_TARGET, pretrained):
                raise ConfigError(f"two targets: target={target!r} and pretrained={pretrained!r}; give one "
                                  "(pretrained is lm-eval's name for it)")
            target = pretrained
        params.pop("max_batch_size", None)  # lm-eval's own batching knobs; a batch here is `batch_size`
        self.method = get_method(method, **params)  # a bad name or value fails before any model loads
        self.batch_size = parse_batch_size(batch_size)
        self.max_gen_toks = whole_number("max_gen_toks", max_gen_toks, 1)
        if max_length is not None:
            max_length = whole_number("max_length", max_length, 2)
        check_backend(decode)
        check_dtype(dtype)
        check_speculate(speculate)
        check_draft_cache(draft_cache)
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval passes cuda:0 unless told otherwise (its own HF model falls back the same way)
            logging.getLogger(__name__).warning("CUDA is not available: running on the CPU")
            device = None
        if pair is None:
            uses_draft = draft is not None and str(draft).lower() != "none" and (
                self.method.uses_draft(self.max_gen_toks) or bool(speculate))
            pair = load_pair(target, draft if uses_draft else None, device=device, dtype=dtype, decode=decode,
                             speculate=speculate, draft_cache=draft_cache)
        self.pair = replace(pair, speculate=speculate, draft_cache=draft_cache) if speculate else pair
        self.tokenizer = pair.tokenizer
        limit = getattr(pair.target.model.config.get_text_config(), "max_position_embeddings", None)
        if max_length is not None and limit is not None and max_length > limit:
            raise ConfigError(f"max_length={max_length} is more than the target's context of {limit} tokens; give "
                              f"at most {limit}, or leave it out")
        self.max_length = max_length or limit or 32768
        self._device = pair.target.model.device

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> DraftKVLM:
        """lm-eval's route from `--model_args`; its own flags (`--batch_size`, `--device`) fill only what
        the model arguments leave out, so `batch_size` may be given in either place."""
        extra = {key: value for key, value in (additional_config or {}).items()
                 if value is not None and key not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> DraftKVLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string or ""), additional_config)

    # ---- tokens ----

    @property
    def prefix_token_id(self) -> int:
        """What an empty context conditions on (lm-eval's convention: BOS, else EOS)."""
        token = self.tokenizer.bos_token_id
        return token if token is not None else self.tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def context_and_continuation(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces of the context go to the continuation, and the continuation's
        tokens are those of context + continuation past the context's (so a merged token counts once)."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:
            return [self.prefix_token_id], self.encode(continuation)
        whole, context_ids = self.encode(context + continuation), self.encode(context)
        return context_ids, whole[len(context_ids):]

    # ---- lm-eval's three requests ----

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self.context_and_continuation(*request.args) for request in requests]
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)  # one compressed context, many continuations
        for index, (context, _) in enumerate(pairs):
            groups[tuple(context)].append(index)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood") as bar:
            for context, members in groups.items():
                continuations = [pairs[i][1] for i in members]
                room = self.max_length + 1 - max(len(c) for c in continuations)  # the last token is not read
                scored, _ = score_continuations(self.pair, list(context)[-max(room, 1):], continuations, self.method)
                for index, score in zip(members, scored, strict=True):
                    results[index] = (score.total, score.is_greedy)
                    self.cache_hook.add_partial("loglikelihood", requests[index].args, results[index])
                bar.update(len(members))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            windows = [make_disjoint_window(window) for window in get_rolling_token_windows(
                token_list=self.encode(request.args[0]), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            total = sum(score_continuations(self.pair, context, [continuation], self.method)[0][0].total
                        for context, continuation in windows)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = defaultdict(list)  # requests that share their generation settings
        for index, request in enumerate(requests):
            groups[repr(sorted(request.args[1].items()))].append(index)
        with tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until") as bar:
            for members in groups.values():
                for start in range(0, len(members), self.batch_size):
                    batch = members[start: start + self.batch_size]
                    texts = self._generate([requests[i].args for i in batch])
                    for index, text in zip(batch, texts, strict=True):
                        results[index] = text
                        self.cache_hook.add_partial("generate_until", requests[index].args, text)
                    bar.update(len(batch))
        return results

    def _generate(self, items: list[tuple[str, dict]]) -> list[str]:
        options = dict(items[0][1])
        until = options.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = whole_number("max_gen_toks", options.pop("max_gen_toks", self.max_gen_toks), 1)
        if max_new >= self.max_length:
            raise ConfigError(f"max_gen_toks={max_new} leaves no room for a context within max_length="
                              f"{self.max_length}; ask for fewer new tokens or raise max_length")
        sampled = options.pop("do_sample", False) or options.get("temperature", 0.0) > 0
        sampling = Sampling(temperature=float(options.get("temperature", 1.0)) if sampled else 0.0,
                            top_p=float(options.get("top_p") or 1.0), top_k=int(options.get("top_k") or 0),
                            seed=options.get("seed"))
        requests, prompts = [], []
        for context, _ in items:
            ids = self.encode(context)[-(self.max_length - max_new):] or [self.prefix_token_id]
            prompts.append(EncodedPrompt(ids, len(ids)))
            requests.append(Request(context=context or " ", chat_template=False, max_new_tokens=max_new,
                                    sampling=sampling, stop=tuple(until)))
        return [result.text for result in run(self.pair, requests, [self.method], prompts=prompts)[0]]

    # ---- chat templates, as lm-eval asks for them ----

    @property
    def tokenizer_name(self) -> str:
        return self.pair.target.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) if chat_template else None

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)


def whole_number(name: str, value: object, minimum: int) -> int:
    """A whole number from a Python caller or lm-eval's argument string ("8" is 8; 8.0, "8.5" and "x" are not)."""
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and text.isdigit())) \
            or int(text) < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return int(text)


def parse_batch_size(value: object) -> int:
    """lm-eval's batch sizes: a number, or "auto" / "auto:N" (one request at a time here, since a batch
    of long prompts is prefilled one row at a time anyway)."""
    if value is None or (isinstance(value, str) and (value == "auto" or value.startswith("auto:"))):
        return 1
    try:
        return whole_number("batch_size", value, 1)
    except ConfigError:
        raise ConfigError(f"batch_size must be a whole number >= 1 or 'auto' (lm-eval's), got {value!r}") from None
