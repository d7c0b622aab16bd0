"""Model loading: embedded names, local folders and GGUF files, hub ids; draft/target pairing.

The embedded registry and the option checks import no torch, so the command line can answer from them
at once; the loaders come in on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

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
from draftkv.options import check_draft_cache, check_speculate, parse_speculate

if TYPE_CHECKING:
    from draftkv.models.dtypes import CpuDtype, cpu_dtype, dtype_name, resolve_dtype
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
    )

LOADING = ("LoadedModel", "ModelPair", "check_family", "check_tokenizers", "load_model", "load_pair",
           "load_tokenizer", "pair_from_models", "resolve_device")
DTYPE_CHOICE = ("CpuDtype", "cpu_dtype", "dtype_name", "resolve_dtype")


def __getattr__(name: str):
    if name in LOADING:
        from draftkv.models import loading

        return getattr(loading, name)
    if name in DTYPE_CHOICE:
        from draftkv.models import dtypes

        return getattr(dtypes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_DRAFT",
    "DEFAULT_TARGET",
    "EMBEDDED_MODELS",
    "CpuDtype",
    "EmbeddedModel",
    "LoadedModel",
    "ModelPair",
    "cache_dir",
    "check_draft_cache",
    "check_family",
    "check_speculate",
    "parse_speculate",
    "check_tokenizers",
    "convert_gguf",
    "cpu_dtype",
    "dtype_name",
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
