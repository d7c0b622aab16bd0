"""The `draftkv` command line: generate, models, methods."""

from __future__ import annotations

import itertools
import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import ConfigError, DraftKVError, PromptError
from .eval import ruler
from .jsonl import check_free, writing
from .methods import METHODS, Method, help_of, method_with_budgets, names
from .models import DEFAULT_DRAFT, DEFAULT_TARGET, cache_dir, embedded_status, parse_speculate
from .models.embedded import verify_cache
from .options import check_backend, check_dtype
from .prompt import encode_prompt
from .types import Request, Sampling

# Only what answers without a model is imported above (no torch, no transformers): help, the method list,
# the model registry and every argument check answer at once. Each command imports what runs its models.

app = typer.Typer(
    help="Draft-based approximate inference for long-context LLMs (SpecKV, SnapKV, ...).",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def run() -> None:
    """The `draftkv` command. Output that cannot be written (a full disk under a redirect, a closed pipe)
    is one line on stderr and exit status 1, not a traceback; every file a command writes has its own message."""
    import os

    try:
        app()
    except OSError as error:
        # Later writes (the interpreter's last flush of stdout) go nowhere instead of failing again.
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), sys.stdout.fileno())
        if not isinstance(error, BrokenPipeError):  # a reader that left (| head) wants nothing more
            err.print(f"error: cannot write the output ({error.strerror or error}); files the command wrote "
                      "before are kept", style="red", markup=False, highlight=False)
        sys.exit(1)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"draftkv {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Draft-based approximate inference for long-context LLMs."""


def parse_budget(text: str) -> int | float:
    """'256' is a token count; '0.25' (anything with a dot or exponent) is a ratio of the prompt."""
    try:
        return float(text) if any(c in text.lower() for c in ".e") else int(text)
    except ValueError:
        raise ConfigError(f"budget must be a token count like 256 or a ratio like 0.25, got {text!r}") from None


def parse_param(item: str) -> tuple[str, Any]:
    """KEY=VALUE, with VALUE read as JSON when it is JSON (numbers, true/false, null) and text otherwise."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--param takes KEY=VALUE, got {item!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def read_context(context: str | None, context_file: Path | None) -> str:
    if context is not None and context_file is not None:
        raise ConfigError("give the context once: either --context or --context-file")
    if context_file is not None:
        if str(context_file) == "-":
            return sys.stdin.read()
        try:
            return context_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"context file {context_file} does not exist") from None
        except UnicodeDecodeError:
            raise ConfigError(f"context file {context_file} is not UTF-8 text") from None
        except OSError as error:
            raise ConfigError(f"cannot read context file {context_file}: {error.strerror}") from None
    if context is not None:
        return context
    return "" if sys.stdin.isatty() else sys.stdin.read()


Question = Annotated[str, typer.Option("--question", "-q", help="The question, placed after the context.")]
Context = Annotated[str | None, typer.Option(help="The context text (or use --context-file, or stdin).")]
ContextFile = Annotated[Path | None, typer.Option(help="Read the context from this file ('-' for stdin).")]
BudgetOption = Annotated[str | None, typer.Option(
    help="KV entries (KV methods) or prompt tokens (prompt methods) kept, e.g. 256, or a ratio of the prompt, e.g. 0.25.")]
PromptBudget = Annotated[str | None, typer.Option(help="Prompt tokens kept: a prompt method's budget, or speckv-pc's prompt stage.")]
CompressionRatio = Annotated[float | None, typer.Option(
    help="kvpress's name for a budget: the share removed, in [0, 1) (0.75 keeps a quarter); instead of --budget.")]
Window = Annotated[int | None, typer.Option(help="Last prompt tokens always kept (default: the method's).")]
Kernel = Annotated[int | None, typer.Option(help="Odd pooling kernel (default: the method's).")]
AllocationOption = Annotated[str | None, typer.Option(
    "--allocation", help="How a KV method spreads its budget over layers and KV heads: uniform, pyramid, ada or global "
                         "(default: the method's own, as its authors run it).")]
Lookahead = Annotated[int | None, typer.Option(help="Draft lookahead tokens (default: the method's).")]
Params = Annotated[list[str] | None, typer.Option("--param", "-p", help="Any method parameter as KEY=VALUE (repeatable).")]
System = Annotated[str | None, typer.Option(help="System prompt.")]
ChatTemplate = Annotated[bool, typer.Option(help="Wrap the prompt in the target's chat template.")]
Target = Annotated[str, typer.Option(help="Target: embedded name, local folder, .gguf file or cached hub id.")]
Draft = Annotated[str, typer.Option(help="Draft model (same forms as --target).")]
Device = Annotated[str | None, typer.Option(help="cpu, cuda, cuda:1 ... (default: cuda if available).")]
DTYPE_HELP = ("auto (the fastest this device measures: bfloat16 on CUDA and on CPUs with bfloat16 matrix units, "
              "else float32), float32, bfloat16 or float16.")


def _dtype(value: str) -> str:
    try:
        return check_dtype(value)
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None


Dtype = Annotated[str, typer.Option(callback=_dtype, help=DTYPE_HELP)]


def _backend(value: str) -> str:
    try:
        return check_backend(value)
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None


DecodeBackend = Annotated[str, typer.Option("--decode", callback=_backend, help="Decode step: auto (static on CUDA, eager elsewhere), eager, "
                                                             "or static (fixed shapes; a CUDA graph on CUDA).")]
def _speculate(value: str) -> int | str:
    try:
        return parse_speculate(value)
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None


SPECULATE_HELP = ("Speculative decoding: the draft proposes this many tokens per target call (0: off; one request at "
                  "a time), or auto (as many as the calls timed on this device say decode fastest; none where none "
                  "does, or where the draft would first read the prompt for less than it saves).")
Speculate = Annotated[str, typer.Option("--speculate", callback=_speculate, help=SPECULATE_HELP)]
DraftCacheKept = Annotated[str, typer.Option("--draft-cache", help="With --speculate: what the draft's cache keeps of "
                                           "the prompt: compressed (the method's budget, by the draft's own "
                                           "attention), whole, or window (its first and last entries).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def method_from_options(method: str, params: list[str] | None, **options: Any):
    """The method with the options the user gave (None means: the method's default)."""
    given: dict[str, Any] = dict(parse_param(item) for item in params or [])
    for key in ("budget", "prompt_budget"):
        if options.get(key) is not None:
            options[key] = parse_budget(options[key])
    given.update({key: value for key, value in options.items() if value is not None})
    return method_with_budgets(method, **given)


def crosses_as_text(method: Method, max_new_tokens: int) -> bool:
    """Prompt methods work with a draft of another tokenizer; methods that pass token ids do not."""
    return not method.target_reads_draft_tokens(max_new_tokens)


def fail(error: DraftKVError) -> typer.Exit:
    err.print(f"error: {error}", style="red", markup=False, highlight=False)
    return typer.Exit(2)


@app.command()
def generate(
    question: Question = "",
    context: Context = None,
    context_file: ContextFile = None,
    method: Annotated[str, typer.Option("--method", "-m", help=f"One of: {', '.join(METHODS)}.")] = "speckv",
    budget: BudgetOption = None,
    prompt_budget: PromptBudget = None,
    compression_ratio: CompressionRatio = None,
    window: Window = None,
    allocation: AllocationOption = None,
    kernel: Kernel = None,
    pooling: Annotated[str | None, typer.Option(help="max or avg (default: the method's).")] = None,
    reduction: Annotated[str | None, typer.Option(help="max or mean (default max).")] = None,
    lookahead: Lookahead = None,
    param: Params = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k best (0: all).")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling.")] = None,
    stop: Annotated[list[str] | None, typer.Option(help="Stop string (repeatable).")] = None,
    system: System = None,
    chat_template: ChatTemplate = True,
    target: Target = DEFAULT_TARGET,
    draft: Draft = DEFAULT_DRAFT,
    device: Device = None,
    dtype: Dtype = "auto",
    decode: DecodeBackend = "auto",
    speculate: Speculate = "0",
    draft_cache: DraftCacheKept = "compressed",
    as_json: AsJson = False,
    stream: Annotated[bool, typer.Option(help="Print the answer as it is generated.")] = False,
    ask: Annotated[list[str] | None, typer.Option(
        help="Query-agnostic: compress the context once, before any question, then answer each --ask "
             "(repeatable) against that one compressed cache.")] = None,
) -> None:
    """Answer a question about a long context with a compressed prompt and/or KV cache."""
    try:
        chosen = method_from_options(method, param, budget=budget, prompt_budget=prompt_budget, window=window, allocation=allocation,
                                     kernel=kernel, pooling=pooling, reduction=reduction, lookahead=lookahead,
                                     compression_ratio=compression_ratio)
        text = read_context(context, context_file)
        # Every check that needs no model, before one loads: sampling values, the request, the questions.
        Request(context=text, question=question, system=system, max_new_tokens=max_new_tokens,
                sampling=Sampling(temperature, top_p, top_k, seed), stop=tuple(stop or ()))
        if ask and not all(q.strip() for q in ask):
            raise PromptError("an --ask question is empty: give each --ask a question")
        if ask and speculate:
            raise ConfigError("--speculate does not apply with --ask: each question is answered from the compressed "
                              "context's cache, which the draft does not hold; leave one of them out")
        if not ask and not text.strip() and not question.strip():
            raise PromptError("the prompt is empty: give a context, a question or both")
        needs_draft = chosen.uses_draft(max_new_tokens) or bool(speculate)
        request = Request(context=text, question="" if ask else question, system=system,
                          max_new_tokens=max_new_tokens, chat_template=chat_template)
        from .api import generate as run_generate
        from .flow import check_fits
        from .models import load_pair
        with err.status("loading models (the first time converts the embedded pair: a few minutes)"):
            pair = load_pair(target, draft if needs_draft else None, device=device, dtype=dtype,
                             allow_tokenizer_mismatch=crosses_as_text(chosen, max_new_tokens), decode=decode,
                             speculate=speculate, draft_cache=draft_cache,
                             before_weights=lambda tokenizer, config: check_fits(
                                 config, "target", len(encode_prompt(tokenizer, request).ids), max_new_tokens))
        if ask:
            answer_each(pair, text, ask, chosen, system, chat_template, as_json, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ()))
            return
        printer = (lambda piece: print(piece, end="", flush=True)) if stream and not as_json else None
        with err.status(f"running {chosen.name}") if printer is None else nullcontext():
            result = run_generate(
                pair, text, question, method=chosen, max_new_tokens=max_new_tokens, temperature=temperature,
                top_p=top_p, top_k=top_k, seed=seed, stop=tuple(stop or ()), system=system,
                chat_template=chat_template, on_text=printer,
            )
    except DraftKVError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps({"text": result.text, "token_ids": result.token_ids,
                               "finish_reason": result.finish_reason, "stats": result.stats.to_dict()}))
        return
    if printer is not None:
        print(flush=True)
    else:
        typer.echo(result.text)
    err.print(result.stats.summary(), markup=False, highlight=False, soft_wrap=True)


def answer_each(pair, context: str, questions: list[str], method: Method, system: str | None, chat_template: bool,
                as_json: bool, **answering: Any) -> None:
    """Query-agnostic mode: one compression of the context, then every question against it, each answered
    with `answering` (max_new_tokens, sampling and stop strings, as `CompressedContext.ask` takes them)."""
    from .context import compress_context

    with err.status(f"compressing the context with {method.name}"):
        compressed = compress_context(pair, context, method=method, system=system, chat_template=chat_template,
                                      max_new_tokens=answering["max_new_tokens"])
    err.print(compressed.stats.summary(), markup=False, highlight=False, soft_wrap=True)
    for question in questions:
        with err.status("answering"):
            result = compressed.ask(question, **answering)
        if as_json:
            typer.echo(json.dumps({"question": question, "text": result.text, "token_ids": result.token_ids,
                                   "finish_reason": result.finish_reason, "stats": result.stats.to_dict()}))
        else:
            typer.echo(f"Q: {question}\nA: {result.text}")
            err.print(result.stats.summary(), markup=False, highlight=False, soft_wrap=True)


@app.command()
def compress(
    question: Question = "",
    context: Context = None,
    context_file: ContextFile = None,
    method: Annotated[str, typer.Option("--method", "-m", help=f"A prompt method: {', '.join(names('prompt'))}.")] = "specpc",
    budget: BudgetOption = None,
    compression_ratio: CompressionRatio = None,
    window: Window = None,
    allocation: AllocationOption = None,
    kernel: Kernel = None,
    lookahead: Lookahead = None,
    param: Params = None,
    system: System = None,
    chat_template: ChatTemplate = True,
    target: Target = DEFAULT_TARGET,
    draft: Draft = DEFAULT_DRAFT,
    device: Device = None,
    dtype: Dtype = "auto",
    decode: DecodeBackend = "auto",
    ids: Annotated[bool, typer.Option("--ids", help="Print the kept token ids (of the templated prompt) instead of text.")] = False,
    as_json: AsJson = False,
) -> None:
    """Compress a prompt without generating: print the kept text (or token ids) for any other engine."""
    try:
        chosen = method_from_options(method, param, budget=budget, window=window, allocation=allocation, kernel=kernel, lookahead=lookahead,
                                     compression_ratio=compression_ratio)
        text = read_context(context, context_file)
        from .compress import check_prompt_method, compress_prompt

        check_prompt_method(chosen)  # before minutes of loading
        from .models import load_pair
        with err.status("loading models"):
            pair = load_pair(target, draft, device=device, dtype=dtype,
                             allow_tokenizer_mismatch=crosses_as_text(chosen, 128), decode=decode)
        with err.status(f"compressing with {chosen.name}"):
            compressed = compress_prompt(pair, text, question, method=chosen, system=system,
                                         chat_template=chat_template)
    except DraftKVError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps(compressed.to_dict()))
        return
    typer.echo(" ".join(map(str, compressed.token_ids)) if ids else compressed.text)
    spans = ", ".join(f"{a}-{b}" for a, b in compressed.spans[:12]) + (" ..." if len(compressed.spans) > 12 else "")
    err.print(f"{compressed.summary()}; kept character spans: {spans}", markup=False, highlight=False, soft_wrap=True)


def _cpu_dtypes() -> dict[str, dict]:
    """What `--dtype auto` decided on the CPUs that ran here (read without torch)."""
    from .models.embedded import CPU_DTYPE_FILE

    try:
        known = json.loads((cache_dir() / CPU_DTYPE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in known.items() if isinstance(value, dict)} if isinstance(known, dict) else {}


@app.command()
def models(
    verify: Annotated[bool, typer.Option("--verify", help="Check every byte of every cached model against the "
                                         "sha256 it was written with; rebuild what does not match.")] = False,
) -> None:
    """The embedded model registry: what is installed and cached, and the sizes."""
    if verify:
        try:
            outcomes = verify_cache()
        except DraftKVError as error:
            raise fail(error) from None
        for folder, outcome in outcomes:
            typer.echo(f"{folder}: {outcome}")
        if not outcomes:
            typer.echo(f"nothing cached in {cache_dir()} yet")
    rows = embedded_status()
    table = Table(title="Embedded models")
    table.add_column("name", no_wrap=True)
    for column in ("role", "installed", "cached", "GGUF", "on disk"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(row["name"], row["role"], "yes" if row["installed"] else "no",
                      "yes" if row["cached"] else "no", _size(row["gguf_bytes"]),
                      _size(row["cached_bytes"]) if row["cached"] else "-")
    console = Console()
    console.print(table)
    console.print(f"cache folder: {cache_dir()} (set DRAFTKV_CACHE_DIR to move it)", highlight=False, soft_wrap=True)
    stored = ", ".join(f"{row['name']} in {row['stored_dtype']}" for row in rows if row["cached"])
    if stored:
        console.print(f"cached weights: {stored}", highlight=False, markup=False, soft_wrap=True)
        checked = ", ".join(f"{row['name']} {row['verified']}" for row in rows if row["cached"])
        console.print(f"every byte last checked: {checked} (each load checks sizes and sampled blocks; "
                      "draftkv models --verify checks every byte)", highlight=False, markup=False, soft_wrap=True)
    for machine, choice in _cpu_dtypes().items():
        console.print(f"dtype auto on {machine}: {choice.get('dtype')} ({choice.get('reason')})", highlight=False,
                      markup=False, soft_wrap=True)
    if not all(row["installed"] for row in rows):
        console.print('install the embedded pair with: pip install "draftkv[embedded]"', highlight=False)


@app.command()
def methods() -> None:
    """The methods registry with every parameter and its default."""
    console = Console()
    for name, method_class in METHODS.items():
        table = Table(title=f"{name}: {method_class.summary}", title_justify="left")
        for column in ("parameter", "default", "meaning"):
            table.add_column(column)
        for param_name, _type, default, meaning in help_of(method_class):
            table.add_row(param_name, repr(default), meaning)
        if not help_of(method_class):
            table.add_row("-", "-", "no parameters")
        console.print(table)


@app.command()
def bench(
    lengths: Annotated[str, typer.Option(help="Context lengths in tokens, comma-separated.")] = "1024,2048,4096,8192",
    methods: Annotated[str, typer.Option(help="Comma-separated methods (dense is always added: every ratio needs it).")] = "dense,snapkv,speckv,specpc,speckv-pc",
    budget: Annotated[str, typer.Option(help="KV budget of KV methods (and speckv-pc's KV stage).")] = "256",
    prompt_budget: Annotated[str, typer.Option(help="Prompt budget of prompt methods (and speckv-pc's prompt stage).")] = "1024",
    new_tokens: Annotated[int, typer.Option(help="New tokens per request (exactly: end-of-text is ignored).", min=1)] = 32,
    repeats: Annotated[int, typer.Option(help="Measured repeats per configuration (after one warm-up); 0: CPU memory probes only.", min=0)] = 3,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma-separated (throughput).")] = "1",
    memory: Annotated[bool, typer.Option(help="CPU: peak memory of each configuration in a fresh subprocess (one more run each).")] = True,
    out: Annotated[Path, typer.Option(help="Results folder (resumes what is there).")] = Path("results/bench"),
    target: Target = DEFAULT_TARGET,
    draft: Draft = DEFAULT_DRAFT,
    device: Device = None,
    dtype: Dtype = "auto",
    decode: DecodeBackend = "auto",
    speculate: Annotated[str, typer.Option(help="Speculative decoding: draft proposals per target call, comma-"
                                                "separated, or auto; each method runs with each (0: without).")] = "0",
    draft_cache: DraftCacheKept = "compressed",
) -> None:
    """Latency, throughput and memory of each method against dense, over context lengths."""
    from . import bench as benchmark

    try:
        chosen = benchmark.method_configs(_split(methods), parse_budget(budget), parse_budget(prompt_budget))
        length_list, batch_list = _split(lengths, int), _split(batch_sizes, int)
        proposals = [parse_speculate(value) for value in _split(speculate, str, "--speculate")]
        if not length_list or min(length_list) < 1 or not batch_list or min(batch_list) < 1:
            raise ConfigError(f"lengths and batch sizes must be positive integers, got {lengths!r} and {batch_sizes!r}")
        _writable(out)
        from .models import dtype_name, load_pair
        with err.status("loading models"):
            pair = load_pair(target, draft, device=device, dtype=dtype, decode=decode, draft_cache=draft_cache)
        spec = {"target": target, "draft": draft, "device": device, "dtype": dtype_name(pair.target.model.dtype),
                "decode": decode,
                "draft_cache": draft_cache} if memory else None
        config = {"lengths": length_list, "methods": chosen, "new_tokens": new_tokens, "repeats": repeats,
                  "batch_sizes": batch_list, "target": target, "draft": draft, "decode": decode,
                  "speculate": proposals, "draft_cache": draft_cache,
                  "device": str(pair.target.model.device), "dtype": dtype_name(pair.target.model.dtype),
                  "environment": benchmark.measurement_environment()}
        benchmark.run_bench(pair, out, lengths=length_list, methods=chosen, batch_sizes=batch_list,
                            new_tokens=new_tokens, repeats=repeats, memory_spec=spec, speculate=proposals or [0])
        markdown, _ = benchmark.report(out, config)
    except DraftKVError as error:
        raise fail(error) from None
    typer.echo(markdown.read_text(encoding="utf-8"))
    err.print(f"results in {out} (runs.jsonl, bench.json, bench.md, latency.png, memory.png)", markup=False,
              highlight=False)


@app.command("lm-eval", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                          "help_option_names": []})
def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness with the `draftkv` model registered: every argument goes to lm-eval
    (`draftkv lm-eval --model draftkv --model_args method=speckv,budget=256 --tasks ...`)."""
    import sys

    try:
        from lm_eval.__main__ import cli_evaluate

        from . import lm_eval  # noqa: F401  (registers the model)
    except ImportError as error:
        raise fail(ConfigError(f"lm-eval is not installed ({error}); pip install 'draftkv[lm-eval]'")) from None
    argv, sys.argv = sys.argv, ["lm-eval", *ctx.args]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    except DraftKVError as error:
        raise fail(error) from None
    finally:
        sys.argv = argv


def parse_bytes(text: str, flag: str) -> int:
    """'8GiB', '512MiB', '2GB' or a plain number of bytes, given to `flag`."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1, "": 1}
    number = text.strip().rstrip("bBiIkKmMgGtT")
    unit = text.strip()[len(number):].lower()
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError):
        raise ConfigError(f"{flag} takes a memory size like 8GiB, 512MiB, 2GB or a number of bytes; got {text!r}") from None


def check_address(host: str, port: int) -> None:
    """The server could listen at host:port (the address exists here and the port is free)."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}; choose another --host or "
                          "--port") from None


def _env(name: str, help: str, **options: Any) -> Any:
    return typer.Option(envvar=f"DRAFTKV_{name}", help=help, **options)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SERVER_PACKAGES = ("fastapi", "uvicorn", "httpx", "pydantic", "prometheus_client", "psutil")  # draftkv[serve]


@app.command()
def serve(
    host: Annotated[str, _env("HOST", "Address to listen on. The default serves this machine only; 0.0.0.0 serves "
                                      "anyone who reaches the port (give --api-key).")] = "127.0.0.1",
    port: Annotated[int, _env("PORT", "Port to listen on.", min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, _env("API_KEY", "Require 'Authorization: Bearer KEY' on every route but /health.")] = None,
    allow_origin: Annotated[list[str] | None, _env("ALLOW_ORIGIN", "A web page's origin (https://app.example.com) "
                                                    "that may call the server from a browser (CORS); repeat for "
                                                    "more, or * for every page. Default: none.")] = None,
    method: Annotated[str | None, _env("METHOD", "Method of requests that name none (default: dense; in proxy mode specpc).")] = None,
    budget: Annotated[str | None, _env("BUDGET", "Default KV budget (a prompt method's budget), for --method.")] = None,
    prompt_budget: Annotated[str | None, _env("PROMPT_BUDGET", "Default prompt budget, for --method.")] = None,
    param: Params = None,
    upstream: Annotated[str | None, _env("UPSTREAM", "Proxy mode: an OpenAI-compatible engine's base URL (http://host:port/v1); only the draft runs here.")] = None,
    upstream_model: Annotated[str | None, _env("UPSTREAM_MODEL", "Proxy mode: the model name to ask the upstream for (and to serve).")] = None,
    upstream_api_key: Annotated[str | None, _env("UPSTREAM_API_KEY", "Proxy mode: bearer token for the upstream.")] = None,
    upstream_timeout: Annotated[float, _env("UPSTREAM_TIMEOUT", "Proxy mode: seconds to wait for the upstream.")] = 600.0,
    model_name: Annotated[str | None, _env("MODEL_NAME", "The model name clients use (default: the target's, or --upstream-model).")] = None,
    max_batch_size: Annotated[int, _env("MAX_BATCH_SIZE", "Most requests run together in one batch.", min=1)] = 8,
    max_queue: Annotated[int, _env("MAX_QUEUE", "Most requests waiting; more are refused with 503.", min=1)] = 256,
    max_prompt_tokens: Annotated[int | None, _env("MAX_PROMPT_TOKENS", "Longest prompt accepted (default: the model's context).")] = None,
    max_tokens: Annotated[int | None, _env("MAX_TOKENS", "New tokens for requests that give no max_tokens (default 256, or --max-tokens-limit if lower).", min=1)] = None,
    max_tokens_limit: Annotated[int | None, _env("MAX_TOKENS_LIMIT", "The most new tokens a request may ask for (default: what the context leaves).", min=1)] = None,
    max_guess_tokens: Annotated[int, _env("MAX_GUESS_TOKENS", "The longest guess a method may ask for: a draft lookahead or LAQ++'s pseudo_tokens.", min=1)] = 512,
    max_probes: Annotated[int, _env("MAX_PROBES", "The most probes a method may read a prompt back in (KVzip: one per chunk).", min=1)] = 64,
    max_logprobs: Annotated[int, _env("MAX_LOGPROBS", "The most likeliest tokens a request may list per token (logprobs, top_logprobs).", min=0, max=20)] = 20,
    max_body_bytes: Annotated[str, _env("MAX_BODY_BYTES", "The largest request body, like 32MiB.")] = "32MiB",
    temperature: Annotated[float, _env("TEMPERATURE", "Temperature for requests that give none (0: greedy).", min=0)] = 0.0,
    timeout: Annotated[float, _env("TIMEOUT", "Seconds a request may take, queueing included (then 504).")] = 600.0,
    memory_limit: Annotated[str | None, _env("MEMORY_LIMIT", "Memory running requests may use, like 8GiB (default: 90% of what is free after loading).")] = None,
    log_level: Annotated[str, _env("LOG_LEVEL", "debug, info, warning, error or critical.")] = "info",
    target: Annotated[str, _env("TARGET", "Target model (local mode): embedded name, folder, .gguf or cached hub id.")] = DEFAULT_TARGET,
    draft: Annotated[str, _env("DRAFT", "Draft model, or 'none' for draft-free methods only (local mode).")] = DEFAULT_DRAFT,
    device: Annotated[str | None, _env("DEVICE", "cpu, cuda, cuda:1 ... (default: cuda if available).")] = None,
    dtype: Annotated[str, _env("DTYPE", DTYPE_HELP, callback=_dtype)] = "auto",
    decode: Annotated[str, _env("DECODE", "Decode step: auto (static on CUDA, eager elsewhere), eager or static.",
                                callback=_backend)] = "auto",
    speculate: Annotated[str, _env("SPECULATE", "Speculative decoding for requests that give no speculate field: "
                                                "draft proposals per target call (0: off; local mode), or auto.",
                                   callback=_speculate)] = "0",
    draft_cache: Annotated[str, _env("DRAFT_CACHE", "With --speculate: what the draft's cache keeps of the prompt: "
                                                    "compressed, whole or window.")] = "compressed",
) -> None:
    """Serve the OpenAI API: locally (draft and target here), or as a compressing proxy (--upstream)."""
    import importlib.util
    import logging

    missing = [name for name in SERVER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise fail(ConfigError(f"the server needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                               "not installed; pip install 'draftkv[serve]'"))
    from .serving.protocol import ServeError
    from .serving.settings import ServeSettings

    if log_level.lower() not in LOG_LEVELS:
        raise fail(ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}; got {log_level!r}"))
    logging.basicConfig(level=log_level.upper(), format="%(message)s")  # request lines are JSON already
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call otherwise
    try:
        params: dict[str, Any] = dict(parse_param(item) for item in param or [])
        for key, value in (("budget", budget), ("prompt_budget", prompt_budget)):
            if value is not None:
                params[key] = parse_budget(value)
        settings = ServeSettings(
            method=method or ("specpc" if upstream else "dense"), params=params, model_name=model_name,
            upstream=upstream, upstream_model=upstream_model, upstream_api_key=upstream_api_key,
            upstream_timeout=upstream_timeout, max_batch_size=max_batch_size, max_queue=max_queue,
            max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens, max_tokens_limit=max_tokens_limit,
            max_guess_tokens=max_guess_tokens, max_probes=max_probes, max_logprobs=max_logprobs, max_body_bytes=parse_bytes(max_body_bytes, "--max-body-bytes"),
            api_key=api_key, allow_origins=tuple(allow_origin or ()), temperature=temperature, timeout=timeout,
            memory_limit=parse_bytes(memory_limit, "--memory-limit") if memory_limit else None)
        if upstream and speculate:
            raise ConfigError("--speculate decodes with the target, which the upstream runs in proxy mode; leave it out")
        check_address(host, port)  # free and bindable, before minutes of loading
        default = method_with_budgets(settings.method, **params)  # a bad default fails before minutes of loading
        if upstream:
            from .serving.engine import check_proxy_method

            check_proxy_method(default)
        # Every flag is checked: now the server's stack and torch.
        import uvicorn

        from .models import ModelPair, load_model, load_pair
        from .serving import create_app

        with err.status("loading models"):
            if upstream:  # only the draft runs here; it stands in for the target's tokenizer and limits
                loaded = load_model(draft, device=device, dtype=dtype)
                pair = ModelPair(loaded, loaded, decode=decode)
            else:
                pair = load_pair(target, None if draft.lower() == "none" else draft, device=device, dtype=dtype,
                                 decode=decode, speculate=speculate, draft_cache=draft_cache)
        application = create_app(pair, settings)
    except (DraftKVError, ServeError) as error:
        raise fail(error if isinstance(error, DraftKVError) else ConfigError(error.message)) from None
    mode = f"proxy to {upstream}" if upstream else f"local, target {pair.target.name}"
    err.print(f"serving on http://{host}:{port}/v1 ({mode}; default method {settings.method})", markup=False,
              highlight=False)
    uvicorn.run(application, host=host, port=port, log_level=log_level.lower(), access_log=False)


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.0f} MiB"


EvalMethods = Annotated[str, typer.Option(help="Comma-separated methods; name@BUDGET (speckv-pc@KV/PROMPT) runs "
                                                "one method at that budget only (a count, or a ratio like 0.25), not "
                                                "at --budgets/--prompt-budgets.")]
KVBudgets = Annotated[str, typer.Option(help="KV budgets (KV methods, and speckv-pc's KV stage): entries per head "
                                                "(256) or a ratio of the prompt (0.25).")]
PromptBudgets = Annotated[str, typer.Option(help="Prompt budgets (prompt methods, and speckv-pc's prompt stage): tokens "
                                                    "(1024) or a ratio of the prompt (0.5).")]
Share = Annotated[bool, typer.Option(help="Run dense and KV methods of a sample from one shared prefill (exact).")]
BatchSettings = Annotated[bool, typer.Option(help="Decode every setting of a sample as one batch of their caches "
                                             "(with --share; batched float arithmetic can flip a rare greedy tie).")]
QueryAgnostic = Annotated[bool, typer.Option(help="Compress the context before the question is known, then ask it.")]
Seed = Annotated[int, typer.Option(help="Seed of the generated samples.")]
Essays = Annotated[Path | None, typer.Option(help="A folder of .txt essays (default: the pinned Paul Graham essays).")]

eval_app = typer.Typer(help="Evaluate methods: RULER generated here, and reports of finished runs.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _split(text: str, kind=str, option: str = "") -> list:
    """A comma-separated option's values; an option that names none is an error, not an empty run."""
    try:
        values = [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{option or 'expected'} a comma-separated list of {kind.__name__}s, got {text!r}") from None
    if not values:
        raise ConfigError(f"{option} names nothing (got {text!r}): give one or more comma-separated values")
    return values


def budget(text: str) -> int | float:
    """A budget as written on the command line: a token count (256) or a ratio of the prompt (0.25)."""
    return int(text) if text.isdigit() else float(text)


def _at_least_one(option: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{option} must be at least 1, got {value}")


def _ruler_tasks(tasks: str) -> list[str]:
    """--tasks as a list ('all': every task), every name checked."""
    chosen = list(ruler.TASKS) if tasks == "all" else _split(tasks, str, "--tasks")
    unknown = sorted(set(chosen) - set(ruler.TASKS))
    if unknown:
        raise ConfigError(f"unknown RULER task(s) {', '.join(unknown)}; tasks: {', '.join(ruler.TASKS)}")
    return chosen


def _writable(folder: Path, option: str = "--out", one_run: bool = True) -> None:
    """The output folder exists (it is created), takes files and no other run is writing to it: checked
    before any model loads."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".draftkv-write-check"
        probe.write_text("", encoding="utf-8")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"{option} {folder} cannot be written to ({error.strerror or error}); "
                          "give a folder you can write") from None
    if one_run:  # a run's folder takes one run at a time
        check_free(folder)


def _needs_draft(runs: list, max_new_tokens: int = 128) -> bool:
    """Whether any setting asks the draft for something (a draft is loaded only then)."""
    return any(setting.make().uses_draft(max_new_tokens) for setting in runs)


@eval_app.command("ruler")
def eval_ruler(
    length: Annotated[str, typer.Option(help="Prompt length(s) in tokens, comma-separated.")] = "4096",
    samples: Annotated[int, typer.Option(help="Samples per task and length.")] = 5,
    tasks: Annotated[str, typer.Option(help="Comma-separated tasks, or 'all' (QA tasks need --squad / --hotpotqa).")] = "all",
    methods: EvalMethods = "dense,snapkv,speckv",
    budgets: KVBudgets = "256",
    prompt_budgets: PromptBudgets = "1024",
    seed: Seed = 0,
    out: Annotated[Path | None, typer.Option(help="Results folder (default results/ruler-LENGTH).")] = None,
    essays: Essays = None,
    squad: Annotated[Path | None, typer.Option(help="A local SQuAD JSON file, for qa_1.")] = None,
    hotpotqa: Annotated[Path | None, typer.Option(help="A local HotpotQA JSON file, for qa_2.")] = None,
    dump: Annotated[Path | None, typer.Option(help="Only write the generated samples to this JSONL file.")] = None,
    share: Share = True,
    batch_settings: BatchSettings = True,
    query_agnostic: QueryAgnostic = False,
    target: Target = DEFAULT_TARGET,
    draft: Draft = DEFAULT_DRAFT,
    device: Device = None,
    dtype: Dtype = "auto",
    decode: DecodeBackend = "auto",
    speculate: Speculate = "0",
    draft_cache: DraftCacheKept = "compressed",
) -> None:
    """Generate RULER at the given lengths with the target's tokenizer and score every method on it."""
    from .eval import report, runner

    try:
        lengths = _split(length, int, "--length")
        _at_least_one("--samples", samples)
        chosen_tasks = _ruler_tasks(tasks)
        runs = runner.settings(_split(methods, str, "--methods"), _split(budgets, budget, "--budgets"),
                               _split(prompt_budgets, budget, "--prompt-budgets"))
        check_backend(decode)  # checked here too: a dump loads no model that would check it
        if dump is None:
            for n in lengths:
                _writable(out or Path(f"results/ruler-{n}" + ("-agnostic" if query_agnostic else "")))
        else:
            _writable(dump.parent, "--dump", one_run=False)
        longest_answer = max(ruler.TASKS[task][0] for task in chosen_tasks)
        from .flow import check_fits
        from .models import load_pair, load_tokenizer

        def fits(_tokenizer: Any, config: Any) -> None:
            for n in lengths:
                check_fits(config, "target", n, longest_answer)

        if dump is not None:  # the samples need the target's tokenizer only
            with err.status("loading the tokenizer"):
                tokenizer = load_tokenizer(target, before_weights=fits)
        else:
            with err.status("loading models"):
                pair = load_pair(target, draft if _needs_draft(runs) or speculate else None, device=device,
                                 dtype=dtype, decode=decode, speculate=speculate, draft_cache=draft_cache,
                                 before_weights=fits)
            tokenizer = pair.tokenizer
        dumped = []
        for n in lengths:
            per_task = []
            for task in chosen_tasks:
                try:
                    per_task.append(ruler.generate(task, n, tokenizer, samples=samples, seed=seed,
                                                essays=str(essays) if essays else None,
                                                squad=str(squad) if squad else None,
                                                hotpotqa=str(hotpotqa) if hotpotqa else None))
                except ruler.TaskUnavailable as skipped:
                    err.print(f"skipping {task}: {skipped}", markup=False, highlight=False)
            # sample 0 of every task, then sample 1 of every task...: a run cut short stays balanced
            generated = [s for batch in itertools.zip_longest(*per_task) for s in batch if s is not None]
            if dump is not None:
                dumped.extend(generated)
                err.print(f"generated {len(generated)} samples of length {n}", markup=False, highlight=False)
                continue
            folder = out or Path(f"results/ruler-{n}" + ("-agnostic" if query_agnostic else ""))
            config = {"benchmark": "ruler", "length": n, "samples": samples, "tasks": chosen_tasks, "seed": seed,
                      "settings": [s.label for s in runs], "target": target, "draft": draft,
                      **({"speculate": speculate, "draft_cache": draft_cache} if speculate else {})}
            runner.run(pair, generated, runs, folder, config, share=share, query_agnostic=query_agnostic,
                       batch_settings=batch_settings)
            summary, _, plot = report.report(folder)
            typer.echo(summary.read_text(encoding="utf-8"))
            err.print(f"results in {folder} (summary.md, summary.csv, {plot.name})", markup=False, highlight=False)
        if dump is not None:  # the file holds this command's samples only, written once they all exist
            partial = dump.with_name(dump.name + ".partial")
            with writing(f"the samples to {dump}", "no samples file was written (an earlier one is as it was)"):
                try:
                    partial.write_text("".join(json.dumps(s.to_dict()) + "\n" for s in dumped), encoding="utf-8")
                    partial.replace(dump)
                finally:
                    partial.unlink(missing_ok=True)
            err.print(f"wrote {len(dumped)} samples to {dump}", markup=False, highlight=False)
    except DraftKVError as error:
        raise fail(error) from None


@eval_app.command("longbench")
def eval_longbench(
    data_dir: Annotated[Path, typer.Option(help="A folder of LongBench JSONL files (<task>.jsonl).")],
    tasks: Annotated[str, typer.Option(help="Comma-separated LongBench tasks.")] = "hotpotqa,qasper",
    methods: EvalMethods = "dense,snapkv,speckv",
    budgets: KVBudgets = "512",
    prompt_budgets: PromptBudgets = "2048",
    samples: Annotated[int | None, typer.Option(help="At most this many items per task (default: all).")] = None,
    max_length: Annotated[int, typer.Option(help="Prompts longer than this are cut in the middle.")] = 8192,
    out: Annotated[Path, typer.Option(help="Results folder.")] = Path("results/longbench"),
    share: Share = True,
    batch_settings: BatchSettings = True,
    query_agnostic: QueryAgnostic = False,
    target: Target = DEFAULT_TARGET,
    draft: Draft = DEFAULT_DRAFT,
    device: Device = None,
    dtype: Dtype = "auto",
    decode: DecodeBackend = "auto",
    speculate: Speculate = "0",
    draft_cache: DraftCacheKept = "compressed",
) -> None:
    """Score methods on LongBench tasks read from local files."""
    from .eval import longbench, report, runner

    try:
        runs = runner.settings(_split(methods, str, "--methods"), _split(budgets, budget, "--budgets"),
                               _split(prompt_budgets, budget, "--prompt-budgets"))
        chosen_tasks = _split(tasks, str, "--tasks")
        _at_least_one("--samples", samples)
        for task in chosen_tasks:
            longbench.read_task(data_dir, task)  # fails fast on a missing or malformed file
        _writable(out)
        from .models import load_pair
        with err.status("loading models"):
            pair = load_pair(target, draft if _needs_draft(runs) or speculate else None, device=device, dtype=dtype,
                             decode=decode, speculate=speculate, draft_cache=draft_cache)
        items = [s for task in chosen_tasks for s in longbench.samples(data_dir, task, pair.tokenizer, limit=samples,
                                                                       max_length=max_length)]
        config = {"benchmark": "longbench", "tasks": chosen_tasks, "samples": samples, "max_length": max_length,
                  "settings": [s.label for s in runs], "target": target, "draft": draft,
                  **({"speculate": speculate, "draft_cache": draft_cache} if speculate else {})}
        runner.run(pair, items, runs, out, config, share=share, query_agnostic=query_agnostic,
                   batch_settings=batch_settings)
        summary, _, plot = report.report(out)
    except DraftKVError as error:
        raise fail(error) from None
    typer.echo(summary.read_text(encoding="utf-8"))
    err.print(f"results in {out} (summary.md, summary.csv, {plot.name})", markup=False, highlight=False)


@eval_app.command("report")
def eval_report(
    folders: Annotated[list[Path], typer.Argument(help="Results folders with results.jsonl (several: across lengths).")],
    out: Annotated[Path, typer.Option(help="Where the cross-length report of several folders goes.")] = Path(
        "results/ruler-by-length"),
    agreement_folders: Annotated[list[Path] | None, typer.Option(
        "--agreement", help="A `draftkv analyze agreement` folder to add to the cross-length report (repeat it, one per length).")
    ] = None,
) -> None:
    """One folder: tables (markdown, CSV) and an accuracy-against-budget plot in it. Several (runs at
    different lengths): the cross-length report in --out (averages, shares of dense, margins against
    length, the paper's methods against dense, verdicts; with --agreement, the draft's agreement with the
    target against length)."""
    from .eval import report

    try:
        if agreement_folders and len(folders) == 1:
            raise ConfigError("--agreement belongs to the cross-length report: give two or more results folders "
                              "(one per length) with it")
        if len(folders) == 1:
            summary, csv_path, plot = report.report(folders[0])
            written = f"{summary}, {csv_path}, {plot}"
        else:
            _writable(out)
            summary, *others = report.by_length(folders, out, agreement_folders)
            written = ", ".join(map(str, [summary, *others]))
    except DraftKVError as error:
        raise fail(error) from None
    typer.echo(summary.read_text(encoding="utf-8"))
    err.print(f"wrote {written}", markup=False, highlight=False)


analyze_app = typer.Typer(help="Analyses of how the draft's view agrees with the target's.", no_args_is_help=True)
app.add_typer(analyze_app, name="analyze")


@analyze_app.command("agreement")
def analyze_agreement(
    length: Annotated[int, typer.Option(help="Prompt length in tokens.")] = 4096,
    samples: Annotated[int, typer.Option(help="Samples per task.")] = 10,
    tasks: Annotated[str, typer.Option(help="Comma-separated RULER tasks, or 'all'.")] = "niah_single_2,niah_multikey_1,vt,fwe",
    budget: Annotated[int, typer.Option(help="KV budget whose top-C set the recall is about (C = budget - 32).")] = 128,
    seed: Seed = 0,
    out: Annotated[Path | None, typer.Option(help="Results folder (default results/agreement-LENGTH).")] = None,
    essays: Essays = None,
    target: Target = DEFAULT_TARGET,
    draft: Draft = DEFAULT_DRAFT,
    device: Device = None,
    dtype: Dtype = "auto",
    decode: DecodeBackend = "auto",
) -> None:
    """Oracle (the target's own answer) vs SpecKV (draft lookahead) vs SnapKV (window) importance, per layer."""
    try:
        chosen_tasks = _ruler_tasks(tasks)
        _at_least_one("--samples", samples)
        _at_least_one("--length", length)
        folder = out or Path(f"results/agreement-{length}")
        _writable(folder)
        from .eval import agreement
        from .models import load_pair
        with err.status("loading models"):
            pair = load_pair(target, draft, device=device, dtype=dtype, decode=decode)
        generated = [s for task in chosen_tasks for s in ruler.generate(
            task, length, pair.tokenizer, samples=samples, seed=seed, essays=str(essays) if essays else None)]
        summary = agreement.run_agreement(pair, generated, folder, budget=budget)
    except DraftKVError as error:
        raise fail(error) from None
    typer.echo(summary.read_text(encoding="utf-8"))
    err.print(f"results in {folder} (agreement.md, agreement.csv, agreement.png)", markup=False, highlight=False)


@app.command("inspect")
def inspect_command(
    question: Question = "",
    context: Context = None,
    context_file: ContextFile = None,
    methods: Annotated[str, typer.Option(help="Comma-separated methods, each at the budgets that apply to it, or "
                                         "pinned: snapkv@256, specpc@1024, speckv-pc@256/1024.")] =
        "dense,snapkv@256,speckv@256,specpc@1024",
    budgets: KVBudgets = "256",
    prompt_budgets: PromptBudgets = "1024",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens of each answer (greedy).", min=1)] = 64,
    answer_prefix: Annotated[str, typer.Option(help="Text that starts the answer (as RULER's prompts have).")] = "",
    system: System = None,
    chat_template: ChatTemplate = True,
    out: Annotated[Path, typer.Option(help="The HTML page to write.")] = Path("inspect.html"),
    as_json: Annotated[bool, typer.Option("--json", help="Also print the page's data as one JSON object.")] = False,
    target: Target = DEFAULT_TARGET,
    draft: Draft = DEFAULT_DRAFT,
    device: Device = None,
    dtype: Dtype = "auto",
) -> None:
    """See what was kept: one page that shades each prompt token by each method's importance, marks what it
    kept, and shows the draft's guess, each answer and its stats."""
    from .eval import runner

    try:
        settings = runner.settings(_split(methods, str, "--methods"), _split(budgets, budget, "--budgets"),
                                   _split(prompt_budgets, budget, "--prompt-budgets"))
        text = read_context(context, context_file)
        if not text.strip() and not question.strip():
            raise PromptError("the prompt is empty: give a context, a question or both")
        request = Request(context=text, question=question, system=system, max_new_tokens=max_new_tokens,
                          chat_template=chat_template, answer_prefix=answer_prefix)
        _writable(out.parent, "--out", one_run=False)
        from .flow import check_fits
        from .inspection import inspect
        from .models import load_pair

        with err.status("loading models"):
            pair = load_pair(target, draft if _needs_draft(settings, max_new_tokens) else None, device=device,
                             dtype=dtype, before_weights=lambda tokenizer, config: check_fits(
                                 config, "target", len(encode_prompt(tokenizer, request).ids), max_new_tokens))
        with err.status(f"reading the prompt with {len(settings)} methods"):
            inspection = inspect(pair, text, question, [s.make() for s in settings], max_new_tokens=max_new_tokens,
                                 system=system, chat_template=chat_template, answer_prefix=answer_prefix)
        with writing(f"the page to {out}", "no page was written"):
            inspection.write(out)
    except DraftKVError as error:
        raise fail(error) from None
    if as_json:
        typer.echo(json.dumps(inspection.to_dict()))
    for view in inspection.views:
        err.print(f"{view.label}: kept {view.kept} {view.kept_unit}; answer: {view.answer.strip()[:80]}",
                  markup=False, highlight=False, soft_wrap=True)
    err.print(f"page in {out} ({out.stat().st_size / 2**10:.0f} KiB, {len(inspection.tokens)} tokens)",
              markup=False, highlight=False)
