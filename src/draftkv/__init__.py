"""draftkv: draft-based approximate inference for long-context LLMs.

    import draftkv
    pair = draftkv.load_pair()            # the embedded Qwen2.5-Coder 1.5B target + 0.5B draft
    result = draftkv.generate(pair, context=..., question=..., method="speckv", budget=256)
    result.text, result.stats
    draftkv.compress_prompt(pair, context=..., question=..., method="specpc", budget=1024).text
"""

from .api import compress_batch, generate, generate_batch, prepare_batch
from .compress import CompressedPrompt, compress_prompt
from .context import CompressedContext, compress_context, compress_context_each
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
from .models import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    EMBEDDED_MODELS,
    ModelPair,
    load_model,
    load_pair,
    pair_from_models,
)
from .types import Request, Result, Sampling, Stats

__version__ = "0.1.0"

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
    "load_model",
    "load_pair",
    "pair_from_models",
    "prepare_batch",
]
