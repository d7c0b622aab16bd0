"""Errors that draftkv raises for bad input.

Every error says what was wrong and what is allowed. They subclass the matching builtin
(ValueError, FileNotFoundError) so callers that catch those keep working.
"""

from __future__ import annotations


class DraftKVError(Exception):
    """Base class of every error draftkv raises on purpose."""


class ConfigError(DraftKVError, ValueError):
    """A method, budget or parameter value that is not allowed."""


class UnknownMethodError(ConfigError, KeyError):
    """A method name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class PromptError(DraftKVError, ValueError):
    """An empty prompt, or one longer than a model's context limit."""


class TokenizerMismatchError(DraftKVError, ValueError):
    """Draft and target tokenizers do not agree, so token ids cannot cross between them."""


class ModelLoadError(DraftKVError, ValueError):
    """A model that cannot be found or read (missing folder, not a GGUF file, ...)."""


class EmbeddedModelError(ModelLoadError):
    """An embedded model whose part packages are missing, corrupt or do not match their checksum."""


class UnsupportedModelError(ModelLoadError):
    """A model family whose cache cannot be compressed per head (latent attention, linear-attention or
    state-space layers)."""
