"""The public entry points of the request flow (the executor in flow/ runs them)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from .engine.decoding import TextCallback
from .errors import ConfigError
from .flow import Observer, Prepared, prepare, run
from .methods import Method, get_method
from .prompt import EncodedPrompt
from .types import Request, Result, Sampling

if TYPE_CHECKING:
    from .models import ModelPair


def check_pair(pair: object) -> None:
    """The first argument is a pair of models, not something else by mistake."""
    from .models import ModelPair

    if not isinstance(pair, ModelPair):
        raise ConfigError(f"pair must be a draftkv.ModelPair (from draftkv.load_pair or pair_from_models), "
                          f"got {type(pair).__name__} {pair!r:.60}")


def generate_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense",
                   on_text: TextCallback | None = None, cancelled: Callable[[int], bool] | None = None,
                   observer: Observer | None = None, **method_params) -> list[Result]:
    """Run requests through the flow as one batch; results equal running them one by one.

    Stage timings in each result's stats are the batch's (the stages run once for all rows).
    `on_text(row, text)` streams each row's new text; a row whose `cancelled(row)` turns true stops
    decoding at its next token. `observer` hears each stage start and end (flow.StageEvent).
    """
    check_pair(pair)
    if not isinstance(requests, list | tuple) or not all(isinstance(r, Request) for r in requests):
        raise ConfigError(f"requests must be a list of draftkv.Request, got {requests!r:.80}")
    if not requests:
        return []
    return run(pair, requests, [get_method(method, **method_params)], on_text=on_text, cancelled=cancelled,
               observer=observer)[0]


def prepare_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense", *,
                  prompts: list[EncodedPrompt] | None = None, **method_params) -> Prepared:
    """Everything before decoding: tokenize, draft pass, both stations, compressed target cache."""
    return prepare(pair, requests, [get_method(method, **method_params)], prompts=prompts)[0]


def compress_batch(pair: ModelPair, requests: list[Request], method: str | Method = "dense", *,
                   observer: Observer | None = None, **method_params) -> Prepared:
    """Tokenize, run the draft when the method needs it, and keep the prompt tokens station 1 keeps;
    no target work."""
    return prepare(pair, requests, [get_method(method, **method_params)], read=False, observer=observer)[0]


def generate(pair: ModelPair, context: str = "", question: str = "", *, method: str | Method = "dense",
             max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, stop: tuple[str, ...] | list[str] = (), system: str | None = None,
             messages: list[dict[str, str]] | None = None, chat_template: bool = True,
             on_text: Callable[[str], None] | None = None, speculate: int | str | None = None,
             **method_params) -> Result:
    """Answer one request; `method_params` are the method's own parameters (budget, window, ...);
    `speculate`: draft tokens proposed per target call while decoding, or "auto" (None: the pair's)."""
    check_pair(pair)
    request = Request(context=context, question=question, messages=messages, system=system,
                      max_new_tokens=max_new_tokens, sampling=Sampling(temperature, top_p, top_k, seed),
                      stop=stop, chat_template=chat_template, speculate=speculate)
    stream = (lambda _row, text: on_text(text)) if on_text is not None else None
    return generate_batch(pair, [request], method, on_text=stream, **method_params)[0]
