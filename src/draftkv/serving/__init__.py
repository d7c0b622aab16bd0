"""`draftkv serve`: an OpenAI-compatible server (local mode) and a compressing proxy (proxy mode)."""

from .app import ServeSettings, create_app

__all__ = ["ServeSettings", "create_app"]
