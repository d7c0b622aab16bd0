"""Model loading: embedded names, local folders and GGUF files, hub ids; draft/target pairing."""

from draftkv.models.embedded import (
    DEFAULT_DRAFT,
    DEFAULT_TARGET,
    EMBEDDED_MODELS,
    EmbeddedModel,
    cache_dir,
    convert_gguf,
    embedded_status,
    ensure_embedded,
    ensure_gguf,
    find_parts,
)
from draftkv.models.loading import (
    LoadedModel,
    ModelPair,
    check_family,
    check_tokenizers,
    load_model,
    load_pair,
    load_tokenizer,
    pair_from_models,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "EMBEDDED_MODELS",
    "EmbeddedModel",
    "LoadedModel",
    "ModelPair",
    "cache_dir",
    "check_family",
    "check_tokenizers",
    "convert_gguf",
    "embedded_status",
    "ensure_embedded",
    "ensure_gguf",
    "find_parts",
    "load_model",
    "load_pair",
    "load_tokenizer",
    "pair_from_models",
    "resolve_device",
    "resolve_dtype",
]
