"""Loading target and draft models: embedded names, local folders, local GGUF files, HF hub ids."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from draftkv.engine.speculation import CallCosts, measure_costs
from draftkv.errors import (
    ConfigError,
    DraftKVError,
    ModelLoadError,
    TokenizerMismatchError,
    UnsupportedModelError,
)
from draftkv.models.dtypes import resolve_dtype
from draftkv.models.embedded import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    EMBEDDED_MODELS,
    ensure_embedded,
    ensure_gguf,
    transformers_bars_off,
)
from draftkv.options import check_backend, check_draft_cache, check_speculate

# Text that any two tokenizers of one family must split identically: prose, code, digits, unicode.
PROBES = (
    "The quick brown fox jumps over the lazy dog.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "3.14159 + 2718281828 = 2718281831.14159",
    "Grüße, 世界! Ωμέγα — naïve café 🙂",
)
MIN_SHARED_VOCAB = 0.99
# GGUF metadata names one end token, but chat models end a turn with several (Qwen: <|im_end|> and
# <|endoftext|>); the official generation configs list them all, so we restore that list.
END_OF_TEXT_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<end_of_turn>")


@dataclass
class LoadedModel:
    """A model with its tokenizer. `source` is one of: embedded, folder, gguf, hub, objects."""

    name: str
    model: Any
    tokenizer: Any
    source: str
    load_seconds: float = 0.0


@dataclass
class ModelPair:
    """A target model and, for methods that need one, a draft model sharing its tokenizer."""

    target: LoadedModel
    draft: LoadedModel | None = None
    # Why the draft's tokenizer differs from the target's, when it does and that was allowed: prompt
    # methods then cross at the text level, and methods that pass token ids refuse to run.
    tokenizer_mismatch: str | None = None
    # The decode step: "auto" (static with a CUDA graph on CUDA, eager elsewhere), "eager" or "static".
    decode: str = "auto"
    # Speculative decoding: the draft proposes this many tokens per target call (0: none; "auto": as
    # many as the costs measured on this device say decode fastest, none where none does), from a cache
    # that keeps the method's budget of the prompt by its own attention ("compressed"), all of it
    # ("whole"), or its first and last entries ("window").
    speculate: int | str = 0
    draft_cache: str = "compressed"
    # `auto`'s costs, measured on the first request that asks for it; every decode adds what it accepted.
    call_costs: CallCosts | None = field(default=None, repr=False, compare=False)

    def speculation_costs(self) -> CallCosts:
        """The measured costs of speculation with this pair (timed once, on first use)."""
        if self.call_costs is None:
            self.call_costs = measure_costs(self.target.model, self.draft.model)
        return self.call_costs

    @property
    def tokenizer(self) -> Any:
        return self.target.tokenizer


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: the given one, else CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(f"Unknown device {device!r}; use e.g. 'cpu', 'cuda' or 'cuda:0'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"Device {device!r} asked for, but CUDA is not available here; use 'cpu'")
    return resolved


SUPPORTED_FAMILIES = ("Llama", "Qwen2/2.5", "Qwen3", "Mistral", "Gemma 2/3", "Phi-3", "OLMo 2", "Granite", "SmolLM3",
                      "Cohere 2", "GPT-OSS")


def check_family(config: Any) -> None:
    """Refuse, from the config alone, a model whose cache cannot be dropped per head: every layer must
    hold per-head keys and values of full or sliding-window attention."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    config = config.get_text_config()
    family = getattr(config, "model_type", type(config).__name__)
    why = None
    if getattr(config, "kv_lora_rank", None) is not None:
        why = ("its attention is multi-head latent attention (MLA): the cache holds one compressed latent per "
               "token shared by all heads, not per-head keys and values")
    else:
        try:
            layers = DynamicCache(config=config).layers
        except Exception as error:  # a config transformers cannot build a cache for
            raise UnsupportedModelError(f"{family} is not supported: transformers cannot build its cache "
                                        f"({type(error).__name__}: {error})") from error
        others = sorted({type(layer).__name__ for layer in layers
                         if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer)})
        if others:
            why = (f"some of its layers keep a state that is not per-head keys and values ({', '.join(others)}: "
                   "linear-attention or state-space layers)")
    if why is not None:
        raise UnsupportedModelError(
            f"{family} is not supported: {why}, so its cache cannot be compressed per head. draftkv compresses "
            f"models whose layers are full or sliding-window attention: {', '.join(SUPPORTED_FAMILIES)}, and the "
            "other such families transformers ships")


BeforeWeights = Callable[[Any, Any], None]  # (tokenizer, config): a check that needs no weights


def _load_folder(source: str | Path, device: torch.device, dtype: torch.dtype,
                 before_weights: BeforeWeights | None = None) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source)
    check_family(config)  # before any weight is read
    tokenizer = AutoTokenizer.from_pretrained(source)
    if before_weights is not None:
        before_weights(tokenizer, config)
    with transformers_bars_off():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def load_model(
    spec: str, *, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
    before_weights: BeforeWeights | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from an embedded name, a local folder or .gguf file, or a hub id.
    `before_weights(tokenizer, config)` runs before any weight is read (a check that needs no model)."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    start = time.perf_counter()
    source, folder = _locate(spec)
    with _load_errors(spec, source, folder):
        model, tokenizer = _load_folder(folder, device, dtype, before_weights)
    if source in ("embedded", "gguf"):
        _add_end_tokens(model, tokenizer)
    return LoadedModel(spec, model, tokenizer, source, time.perf_counter() - start)


def load_tokenizer(spec: str, *, before_weights: BeforeWeights | None = None) -> Any:
    """The tokenizer of a model `load_model` takes, without its weights (work that only tokenizes);
    `before_weights(tokenizer, config)` runs on it as it would before a load."""
    from transformers import AutoConfig, AutoTokenizer

    source, folder = _locate(spec)
    with _load_errors(spec, source, folder):
        config = AutoConfig.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if before_weights is not None:
            before_weights(tokenizer, config)
    return tokenizer


def _locate(spec: str) -> tuple[str, str | Path]:
    """Where a model spec's files are: (source kind, folder or hub id)."""
    path = Path(spec).expanduser()
    if spec in EMBEDDED_MODELS:
        return "embedded", ensure_embedded(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"Folder {path} has no config.json, so it is not a Hugging Face model folder")
        return "folder", path
    if path.is_file():
        return "gguf", ensure_gguf(path)
    if spec.endswith(".gguf"):
        raise ModelLoadError(f"GGUF file {path} does not exist")
    return "hub", spec


@contextmanager
def _load_errors(spec: str, source: str, folder: str | Path) -> Iterator[None]:
    """A failed load as a ModelLoadError that says where draftkv looked; our own errors pass as they are."""
    try:
        yield
    except DraftKVError:  # an unsupported family, or the caller's own check
        raise
    except Exception as error:
        if source != "hub":
            raise ModelLoadError(f"Cannot load the model in {folder}: {type(error).__name__}: {error}") from error
        raise ModelLoadError(
            f"Cannot load {spec!r}: it is not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            f"not a local folder or .gguf file, and not a hub model in the local Hugging Face cache "
            f"({type(error).__name__}: {error})"
        ) from error


def _add_end_tokens(model: Any, tokenizer: Any) -> None:
    eos = model.generation_config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    vocab = tokenizer.get_vocab()
    ids += [vocab[token] for token in END_OF_TEXT_TOKENS if token in vocab and vocab[token] not in ids]
    model.generation_config.eos_token_id = ids


def _mismatch(message: str) -> TokenizerMismatchError:
    return TokenizerMismatchError(
        f"Draft and target tokenizers differ: {message}. SpecKV and the other draft-based methods pass token "
        "ids between the two models, so they need models of the same tokenizer family."
    )


def check_tokenizers(target_tokenizer: Any, draft_tokenizer: Any) -> None:
    """Raise TokenizerMismatchError unless the two tokenizers give every shared token the same id."""
    if target_tokenizer is draft_tokenizer:
        return
    target_vocab, draft_vocab = target_tokenizer.get_vocab(), draft_tokenizer.get_vocab()
    shared = target_vocab.keys() & draft_vocab.keys()
    smaller = min(len(target_vocab), len(draft_vocab))
    if len(shared) < MIN_SHARED_VOCAB * smaller:
        raise _mismatch(
            f"they share only {len(shared):,} tokens, {len(shared) / max(smaller, 1):.1%} of the smaller "
            f"vocabulary ({smaller:,} tokens; at least {MIN_SHARED_VOCAB:.0%} needed)"
        )
    for token in sorted(shared, key=target_vocab.__getitem__):
        if target_vocab[token] != draft_vocab[token]:
            raise _mismatch(
                f"token {token!r} has id {target_vocab[token]} in the target and {draft_vocab[token]} in the draft"
            )
    for attribute in ("eos_token_id", "bos_token_id"):
        target_id, draft_id = getattr(target_tokenizer, attribute), getattr(draft_tokenizer, attribute)
        if target_id is not None and draft_id is not None and target_id != draft_id:
            raise _mismatch(f"{attribute} is {target_id} in the target and {draft_id} in the draft")
    for text in PROBES:
        target_ids = target_tokenizer.encode(text, add_special_tokens=False)
        draft_ids = draft_tokenizer.encode(text, add_special_tokens=False)
        if target_ids != draft_ids:
            raise _mismatch(f"{text!r} encodes to {target_ids} in the target and {draft_ids} in the draft")


def load_pair(
    target: str = DEFAULT_TARGET,
    draft: str | None = DEFAULT_DRAFT,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    allow_tokenizer_mismatch: bool = False,
    decode: str = "auto",
    speculate: int | str = 0,
    draft_cache: str = "compressed",
    before_weights: BeforeWeights | None = None,
) -> ModelPair:
    """Load a target and (unless `draft` is None, for draft-free methods) a draft, and check they pair.

    A draft with another tokenizer is refused, unless `allow_tokenizer_mismatch`: then prompt methods
    work at the text level, and methods that pass token ids (SpecKV) refuse to run. `decode`: the
    decode step, "auto" (static with a CUDA graph on CUDA, eager elsewhere), "eager" or "static".
    `speculate`: the draft proposes that many tokens per target call while decoding (0: none; "auto": as
    many as the costs measured on this device say decode fastest), from a
    cache that keeps what `draft_cache` says (see ModelPair).
    `before_weights(tokenizer, config)`: a check on the target that needs no weights, run before any load.
    """
    check_backend(decode)
    check_speculate(speculate)
    check_draft_cache(draft_cache)
    target_model = load_model(target, device=device, dtype=dtype, before_weights=before_weights)
    draft_model = load_model(draft, device=device, dtype=dtype) if draft is not None else None
    return replace(_paired(target_model, draft_model, allow_tokenizer_mismatch), decode=decode, speculate=speculate,
                   draft_cache=draft_cache)


def _paired(target: LoadedModel, draft: LoadedModel | None, allow_mismatch: bool) -> ModelPair:
    if draft is None:
        return ModelPair(target)
    try:
        check_tokenizers(target.tokenizer, draft.tokenizer)
    except TokenizerMismatchError as error:
        if not allow_mismatch:
            raise TokenizerMismatchError(
                f"{error} Prompt methods can still run across tokenizers, at the text level: pass "
                "allow_tokenizer_mismatch=True."
            ) from None
        return ModelPair(target, draft, str(error))
    return ModelPair(target, draft)


def _model_name(model: Any) -> str:
    return getattr(model.config, "name_or_path", "") or type(model).__name__


def pair_from_models(
    target_model: Any, target_tokenizer: Any, draft_model: Any = None, draft_tokenizer: Any = None,
    *, allow_tokenizer_mismatch: bool = False, decode: str = "auto", speculate: int | str = 0,
    draft_cache: str = "compressed",
) -> ModelPair:
    """A pair from transformers objects the caller already has; the draft defaults to the target's tokenizer."""
    check_backend(decode)
    check_speculate(speculate)
    check_draft_cache(draft_cache)
    for model in filter(None, (target_model, draft_model)):
        check_family(model.config)
    target = LoadedModel(_model_name(target_model), target_model, target_tokenizer, "objects")
    draft = None
    if draft_model is not None:
        draft_tokenizer = target_tokenizer if draft_tokenizer is None else draft_tokenizer
        draft = LoadedModel(_model_name(draft_model), draft_model, draft_tokenizer, "objects")
    return replace(_paired(target, draft, allow_tokenizer_mismatch), decode=decode, speculate=speculate,
                   draft_cache=draft_cache)
