"""A draftkv server on a loopback port, for the server tests: start it, call it, read its metrics."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import uvicorn
from fastapi import FastAPI

from draftkv.models import ModelPair
from draftkv.serving import ServeSettings, create_app

MODEL = "tiny"
MESSAGES = [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "alpha bravo charlie. what is the magic number?"}]


class Live:
    """An app served by uvicorn on a free loopback port, in a thread."""

    def __init__(self, app: FastAPI):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=options.pop("api_key", "unused"), max_retries=0, **options)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(pair: ModelPair, **settings) -> Live:
    return Live(create_app(pair, ServeSettings(model_name=MODEL, **settings)))


def metric(live: Live, name: str, **labels) -> float:
    """The value of a sample from the /metrics text whose labels include `labels` (0 when absent)."""
    for line in httpx.get(f"{live.root}/metrics").text.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{")[0] == name and all(f'{key}="{want}"' in sample for key, want in labels.items()):
            return float(value)
    return 0.0


def post(live: Live, path: str, body, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(live.url + path, content=content, headers={"content-type": "application/json", **headers},
                      timeout=60)
