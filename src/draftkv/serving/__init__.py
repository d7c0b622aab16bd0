"""`draftkv serve`: an OpenAI-compatible server (local mode) and a compressing proxy (proxy mode).

`ServeSettings` imports no server stack and no torch (the command line checks its flags first);
`create_app` brings them in when first asked for."""

from typing import Any

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
