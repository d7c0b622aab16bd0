"""draftkv: draft-based approximate inference for long-context LLMs.

    import draftkv
    pair = draftkv.load_pair()            # the embedded Qwen2.5-Coder 1.5B target + 0.5B draft
    result = draftkv.generate(pair, context=..., question=..., method="speckv", budget=256)
    result.text, result.stats
    draftkv.compress_prompt(pair, context=..., question=..., method="specpc", budget=1024).text

The names that run models (and so import torch and transformers) are loaded on first use: `import
draftkv` and the command line's help, method list and argument checks answer without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    ConfigError,
    DraftKVError,
    EmbeddedModelError,
    ModelLoadError,
    PromptError,
    TokenizerMismatchError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .methods import METHODS, Method, get_method
from .models import DEFAULT_DRAFT, DEFAULT_TARGET, EMBEDDED_MODELS
from .types import Request, Result, Sampling, Stats

if TYPE_CHECKING:
    from .api import compress_batch, generate, generate_batch, prepare_batch
    from .compress import CompressedPrompt, compress_prompt
    from .context import CompressedContext, compress_context, compress_context_each
    from .inspection import Inspection, inspect
    from .models import ModelPair, load_model, load_pair, pair_from_models

__version__ = "0.1.0"

# name -> the module that defines it, imported when the name is first asked for
ON_FIRST_USE = {
    "compress_batch": ".api", "generate": ".api", "generate_batch": ".api", "prepare_batch": ".api",
    "CompressedPrompt": ".compress", "compress_prompt": ".compress",
    "CompressedContext": ".context", "compress_context": ".context", "compress_context_each": ".context",
    "Inspection": ".inspection", "inspect": ".inspection",
    "ModelPair": ".models", "load_model": ".models", "load_pair": ".models", "pair_from_models": ".models",
}


def __getattr__(name: str):
    if name in ON_FIRST_USE:
        return getattr(importlib.import_module(ON_FIRST_USE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *ON_FIRST_USE})


__all__ = [
    "CompressedContext",
    "CompressedPrompt",
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "EMBEDDED_MODELS",
    "METHODS",
    "ConfigError",
    "DraftKVError",
    "EmbeddedModelError",
    "Inspection",
    "Method",
    "ModelLoadError",
    "ModelPair",
    "PromptError",
    "Request",
    "Result",
    "Sampling",
    "Stats",
    "TokenizerMismatchError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "compress_batch",
    "compress_context",
    "compress_context_each",
    "compress_prompt",
    "generate",
    "generate_batch",
    "get_method",
    "inspect",
    "load_model",
    "load_pair",
    "pair_from_models",
    "prepare_batch",
]
