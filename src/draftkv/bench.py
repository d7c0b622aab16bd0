"""`draftkv bench`: latency, throughput and memory of every method against dense, over context length.

The protocol (EVALUATION.md): one process, the same inputs for every method, methods interleaved
within each repeat after one warm-up, at least 3 repeats, medians with min-max, and every figure's
ratio to dense from the same run (absolute times on shared machines are noise; ratios within a run
are the figure). Peak memory: on CUDA `max_memory_allocated`, reset per run; on CPU the peak resident
memory of a fresh subprocess per configuration (one more run each), so that one configuration's
allocations never count against another's. Rows are appended to `runs.jsonl` as they finish, so a
killed sweep resumes where it stopped; a configuration that fails is recorded and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DraftKVError
from .jsonl import append_row, drop_torn_tail, exclusive, read_rows, writing
from .methods import Method, budget_params, budget_settings, get_method, method_spec
from .plotting import line_styles
from .progress import progress_bar
from .prompt import encode_prompt
from .synthetic import LAUNCH_QUESTION, notes_context
from .types import Request

if TYPE_CHECKING:
    from .flow import StageEvent
    from .models import ModelPair

DRAFT_STAGES = ("draft_prefill", "draft_lookahead", "draft_scoring")
ANSWER = re.compile(r"14(th)?\s+(of\s+)?October|October\s+14", re.IGNORECASE)
# (column, row key, what it is) for the table; ratios to dense are added for the first five.
COLUMNS = [
    ("TTFT", "ttft_s", "time to first token, s"),
    ("decode ms/tok", "decode_ms_per_token", "decode time per new token after the first, ms"),
    ("end-to-end", "e2e_s", "all stages and every new token, s"),
    ("peak memory", "peak_memory_bytes", "what the run adds to memory at its peak (weights excluded)"),
    ("peak resident", "peak_memory_total_bytes", "the process's peak memory, weights included (CPU: resident set)"),
    ("KV bytes", "kv_bytes", "KV cache after compression, per request"),
    ("draft KV", "draft_kv_bytes", "speculation: the draft's cache when decoding starts, per request"),
    ("tokens/s", "tokens_per_s", "new tokens of the whole batch per second, end to end"),
    ("draft share", "draft_share", "draft prefill + lookahead + scoring over end-to-end"),
    ("accepted", "accepted_guess_tokens", "guess tokens the target's check kept as the answer's first, per request"),
    ("acceptance", "acceptance", "speculation: the share of the draft's proposals the target kept"),
]


@dataclass(frozen=True)
class Config:
    """One cell of the sweep: a method at a context length and a batch size."""

    method: str
    params: tuple[tuple[str, Any], ...]
    length: int
    batch: int
    speculate: int | str = 0  # draft tokens proposed per target call while decoding, or "auto"
    dtype: str = ""  # what the models run in (the pair's)

    @property
    def label(self) -> str:
        params = ",".join(f"{key}={value}" for key, value in self.params)
        label = f"{self.method}({params})" if params else self.method
        return f"{label} +speculate={self.speculate}" if self.speculate else label

    def make(self) -> Method:
        return get_method(self.method, **dict(self.params))

    def key(self, repeat: int) -> str:
        return f"{self.length}|{self.batch}|{self.label}|{self.dtype}|{repeat}"


def method_configs(methods: list[str], budget: int | float, prompt_budget: int | float) -> list[tuple[str, dict]]:
    """Each method (`name` or `name:key=value:...`) with the budgets that apply to it (KV budget, prompt
    budget, or both)."""
    chosen = []
    for text in methods:
        name, given = method_spec(text)  # fails fast on an unknown name or parameter
        (kv, prompt), = budget_settings(name, [budget], [prompt_budget])
        params = {**given, **budget_params(name, kv, prompt)}
        get_method(name, **params)  # a budget the method refuses fails before the sweep
        chosen.append((name, params))
    if "dense" not in [name for name, _ in chosen]:
        chosen.insert(0, ("dense", {}))  # every ratio needs it
    return chosen


def bench_requests(tokenizer, length: int, batch: int, new_tokens: int, speculate: int | str = 0) -> list[Request]:
    """`batch` prompts of `length` tokens (the chat template included): notes with one launch fact at
    the middle and a question about it, each row with other notes. Exactly `new_tokens` are generated
    (`speculate`: with that many draft proposals per target call)."""
    overhead = len(encode_prompt(tokenizer, Request(context="x", question=LAUNCH_QUESTION)).ids) - 1
    if length <= overhead + 16:
        raise ConfigError(f"a benchmark length must be above {overhead + 16} tokens (the template and question), "
                          f"got {length}")
    return [Request(context=notes_context(length - overhead, tokenizer, seed=length * 100 + row),
                    question=LAUNCH_QUESTION, max_new_tokens=new_tokens, ignore_eos=True, speculate=speculate)
            for row in range(batch)]


def measure(pair: ModelPair, method: Method, requests: list[Request],
            observer: Callable[[StageEvent], None] | None = None) -> dict:
    """One run of a batch: the figures of one row of the sweep (`observer`: hears each stage)."""
    import torch

    from .api import generate_batch

    device = pair.target.model.device
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    started = time.perf_counter()
    results = generate_batch(pair, requests, method, observer=observer)
    wall = time.perf_counter() - started
    stats = results[0].stats  # stage timings are the batch's
    timings = stats.timings
    new_tokens = sum(r.stats.new_tokens for r in results)
    draft = sum(timings.get(stage, 0.0) for stage in DRAFT_STAGES)
    steps = max(results[0].stats.new_tokens - 1, 1)
    row = {
        "prompt_tokens": stats.prompt_tokens, "kept_prompt_tokens": stats.kept_prompt_tokens,
        "ttft_s": stats.time_to_first_token, "e2e_s": stats.total_time, "wall_s": wall,
        # Speculation's draft steps (and its reading of the prompt) are part of decoding.
        "decode_ms_per_token": 1000 * sum(timings.get(stage, 0.0) for stage in ("decode", "draft_decode",
                                                                                "speculation_prefill")) / steps,
        "tokens_per_s": new_tokens / stats.total_time if stats.total_time else 0.0,
        "draft_share": draft / stats.total_time if stats.total_time else 0.0,
        "kv_bytes": stats.kv_bytes, "kv_bytes_dense": stats.kv_bytes_dense, "kv_entries": stats.kv_entries,
        "kv_bytes_stored": stats.kv_bytes_stored,  # what the cache tensors hold: measured, not computed
        "new_tokens": new_tokens, "timings": timings, "correct": all(bool(ANSWER.search(r.text)) for r in results),
        "accepted_guess_tokens": sum(r.stats.accepted_guess_tokens for r in results) / len(results),
        "proposed_tokens": sum(r.stats.proposed_tokens for r in results),
        "accepted_proposals": sum(r.stats.accepted_proposals for r in results),
        "acceptance": (sum(r.stats.accepted_proposals for r in results) / proposed
                       if (proposed := sum(r.stats.proposed_tokens for r in results)) else None),
        "target_calls": sum(r.stats.speculation_rounds for r in results),
        "draft_kv_bytes": sum(r.stats.draft_kv_bytes for r in results) / len(results),
        "answer": results[0].text,
        "note": stats.note,  # e.g. why a decode asked to speculate did not
    }
    if device.type == "cuda":
        row["peak_memory_bytes"] = (stats.peak_memory_bytes or 0) - before
        row["peak_memory_total_bytes"] = stats.peak_memory_bytes
    return row


# ---- CPU peak memory, in a fresh subprocess per configuration ----

def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Return freed memory to the system, then reset the peak resident size (VmHWM); Linux only."""
    _trim()
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


# glibc keeps freed blocks for reuse, so the resident size also counts what earlier allocations left
# behind, differently from run to run (dense at 2k measured anywhere from 420 to 700 MiB). The probe's
# process returns every block of 64 KiB or more to the system as soon as it is freed, and trims the
# rest at each reset: its resident size then follows the memory the run holds (as max_memory_allocated
# does on CUDA), and repeated probes agree within a few MiB.
PROBE_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measurement_environment() -> dict[str, str]:
    """The settings that change what is measured, for the results' config: the thread counts and the
    allocators' (MKL keeps its product buffers in a pool unless MKL_DISABLE_FAST_MM is set; probes
    inherit this environment)."""
    names = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DISABLE_FAST_MM", "PYTORCH_CUDA_ALLOC_CONF")
    return {name: os.environ[name] for name in names if name in os.environ}


def _trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def memory_probe(spec: dict) -> dict:
    """Run one configuration once in this (fresh) process and report the peak memory it added, with the
    run's own figures (a sweep with no timed repeats reports those: at prompts so long that one run takes
    many minutes, one-time costs are lost in it)."""
    import torch

    from .models import load_pair

    pair = load_pair(spec["target"], spec["draft"], device=spec.get("device"), dtype=spec.get("dtype"),
                     decode=spec.get("decode", "auto"), draft_cache=spec.get("draft_cache", "compressed"))
    requests = bench_requests(pair.tokenizer, spec["length"], spec["batch"], spec["new_tokens"], spec.get("speculate", 0))
    method = get_method(spec["method"], **spec["params"])
    # Weights loaded from safetensors are mapped lazily: touch every one, so that the pages the run
    # would fault in count as the weights' and not as the run's.
    with torch.inference_mode():
        for loaded in filter(None, (pair.target, pair.draft)):
            for tensor in [*loaded.model.parameters(), *loaded.model.buffers()]:
                tensor.float().sum()
    gc.collect()
    resettable = _reset_peak()
    before = (_status_kib("VmRSS") or 0) * 1024
    # The target stage's own peak: reset the high-water mark again when the target's prefill starts
    # (after the draft's pass), so the draft's peak does not count for it.
    stages: dict[str, int] = {}

    def at_target_prefill(event: StageEvent) -> None:
        if (event.stage, event.event) != ("target_prefill", "start") or not resettable:
            return
        if (peak := _status_kib("VmHWM")) is not None:
            stages["draft_stage_peak"] = peak * 1024
            _reset_peak()

    figures = measure(pair, method, requests, observer=at_target_prefill)
    if resettable and (peak := _status_kib("VmHWM")) is not None:
        target_peak = peak * 1024
        peak_bytes = max(target_peak, stages.get("draft_stage_peak", 0))
    else:  # no reset: the peak since the process started (weights included)
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_bytes = target_peak = kib if sys.platform == "darwin" else kib * 1024
    return {**figures, "peak_memory_bytes": max(peak_bytes - before, 0), "peak_memory_total_bytes": peak_bytes,
            "target_stage_peak_bytes": max(target_peak - before, 0), "rss_before_bytes": before}


def probe_in_subprocess(spec: dict) -> dict:
    completed = subprocess.run([sys.executable, "-m", "draftkv.bench", json.dumps(spec)], capture_output=True,
                               text=True, env={**os.environ, **PROBE_ALLOCATOR, "TQDM_DISABLE": "1"})
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"memory probe failed: {completed.stderr.strip().splitlines()[-1:] or completed.returncode}")
    return json.loads(lines[-1])


# ---- the sweep ----

def run_bench(pair: ModelPair, out: Path, *, lengths: list[int], methods: list[tuple[str, dict]],
              batch_sizes: tuple[int, ...] | list[int] = (1,), new_tokens: int = 32, repeats: int = 3,
              memory_spec: dict | None = None, speculate: tuple[int | str, ...] | list[int | str] = (0,)) -> list[dict]:
    """Sweep lengths x batch sizes x methods x `speculate` (draft proposals per target call; 0: none),
    `repeats` times, methods interleaved; append to
    `out/runs.jsonl` and return every row (earlier ones included). `memory_spec` (target, draft,
    device, dtype) lets CPU runs measure peak memory in a subprocess; without it, CPU memory is skipped.
    `repeats=0` runs the memory probes alone (they do not need a quiet machine, the timed rounds do)."""
    on_cpu = pair.target.model.device.type == "cpu"
    if repeats < 0 or new_tokens < 1:
        raise ConfigError(f"repeats must be >= 0 and new tokens >= 1, got {repeats} and {new_tokens}")
    if repeats == 0 and not (on_cpu and memory_spec is not None):
        raise ConfigError("repeats 0 measures only the CPU memory probes; on this device, or without them, it "
                          "would measure nothing (on CUDA the peak memory comes from the timed repeats)")
    with writing(f"the benchmark rows to {out / 'runs.jsonl'}", "the rows already written are kept, and the same "
                 "command resumes after them"), exclusive(out):
        return sweep(pair, out, lengths, methods, batch_sizes, new_tokens, repeats, memory_spec, on_cpu, speculate)


def sweep(pair: ModelPair, out: Path, lengths: list[int], methods: list[tuple[str, dict]],
          batch_sizes: tuple[int, ...] | list[int], new_tokens: int, repeats: int, memory_spec: dict | None,
          on_cpu: bool, speculate: tuple[int | str, ...] | list[int | str] = (0,)) -> list[dict]:
    from .api import generate_batch
    from .models import dtype_name

    dtype = dtype_name(pair.target.model.dtype)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "runs.jsonl"
    drop_torn_tail(path)
    rows = read_rows(path)
    done = {row.get("key") for row in rows}
    configs = [Config(name, tuple(sorted(params.items())), length, batch, proposals, dtype)
               for length in lengths for batch in batch_sizes for name, params in methods for proposals in speculate]
    todo = [(c, r) for r in range(repeats) for c in configs if c.key(r) not in done]
    memory_todo = [c for c in configs if on_cpu and memory_spec is not None and c.key(-1) not in done]
    if todo:  # warm-up: each method still to time once, at the shortest length left, so one-time costs miss the measurements
        with contextlib.suppress(DraftKVError):  # a failing configuration is reported by its measured runs
            warm = bench_requests(pair.tokenizer, min(c.length for c, _ in todo), 1, 2)
            for config in {c.label: c for c, _ in todo}.values():
                with contextlib.suppress(DraftKVError):
                    generate_batch(pair, warm, config.make())
            if pair.draft is not None and any(c.speculate == "auto" for c, _ in todo):
                pair.speculation_costs()  # timed once per pair, before the runs that use it
    with open(path, "a", encoding="utf-8") as handle, progress_bar() as progress:
        task = progress.add_task("bench", total=len(todo) + len(memory_todo))
        inputs: dict[tuple[int, int, int], list[Request] | Exception] = {}
        for config, repeat in todo:  # repeat-major, so methods interleave within each repeat
            progress.update(task, description=f"{config.length} tok x{config.batch} {config.label} #{repeat}")
            row = {"key": config.key(repeat), "method": config.method, "label": config.label,
                   "params": dict(config.params), "length": config.length, "batch": config.batch, "repeat": repeat,
                   "speculate": config.speculate, "dtype": dtype}
            shape = (config.length, config.batch, config.speculate)
            try:
                if shape not in inputs:
                    try:
                        inputs[shape] = bench_requests(pair.tokenizer, *shape[:2], new_tokens, config.speculate)
                    except DraftKVError as error:
                        inputs[shape] = error
                requests = inputs[shape]
                if isinstance(requests, Exception):
                    raise requests
                row.update(measure(pair, config.make(), requests))
            except Exception as error:  # reported in the table; the sweep goes on
                row["error"] = f"{type(error).__name__}: {error}"
            append_row(handle, row)
            rows.append(row)
            progress.advance(task)
        for config in memory_todo:
            progress.update(task, description=f"memory {config.length} tok x{config.batch} {config.label}")
            row = {"key": config.key(-1), "method": config.method, "label": config.label, "params": dict(config.params),
                   "length": config.length, "batch": config.batch, "repeat": -1, "speculate": config.speculate,
                   "dtype": dtype}
            try:
                row.update(probe_in_subprocess({**memory_spec, "method": config.method, "params": dict(config.params),
                                                "length": config.length, "batch": config.batch,
                                                "new_tokens": new_tokens, "speculate": config.speculate}))
            except Exception as error:
                row["error"] = f"{type(error).__name__}: {error}"
            append_row(handle, row)
            rows.append(row)
            progress.advance(task)
    return rows


# ---- summary: medians, min-max, ratios to dense ----

def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (length, batch, method): median, min and max of each figure and its ratio to dense."""
    cells: dict[tuple[int, int, str], dict] = {}
    for row in rows:
        cell = cells.setdefault((row["length"], row["batch"], row["label"], row.get("dtype", "")),
                                {"length": row["length"], "batch": row["batch"], "label": row["label"],
                                 "dtype": row.get("dtype", ""),
                                 "method": row["method"], "params": row["params"], "runs": [], "memory": None,
                                 "errors": []})
        if "error" in row:
            cell["errors"].append(row["error"])
        elif row["repeat"] < 0:
            cell["memory"] = row
        else:
            cell["runs"].append(row)
    summary = []
    for cell in cells.values():
        runs = cell.pop("runs")
        memory = cell.pop("memory")
        if not runs and memory is not None and "e2e_s" in memory:  # no timed repeat: the probe's own run
            runs, cell["timed_in_probe"] = [memory], True
        for _, key, _ in COLUMNS:
            values = [run[key] for run in runs if run.get(key) is not None]
            if key in ("peak_memory_bytes", "peak_memory_total_bytes") and memory is not None:
                values = [memory[key]] if memory.get(key) is not None else []
                cell["target_stage_peak_bytes"] = memory.get("target_stage_peak_bytes")
            if values:
                cell[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        cell["repeats"] = len(runs)
        if runs:
            last = runs[-1]
            cell.update(prompt_tokens=last["prompt_tokens"], kept_prompt_tokens=last["kept_prompt_tokens"],
                        kv_entries=last["kv_entries"], kv_bytes_dense=last["kv_bytes_dense"],
                        kv_bytes_stored=last["kv_bytes_stored"],
                        correct=sum(run["correct"] for run in runs),
                        timings={stage: statistics.median(run["timings"].get(stage, 0.0) for run in runs)
                                 for stage in sorted({s for run in runs for s in run["timings"]})})
        summary.append(cell)
    for cell in summary:
        dense = next((c for c in summary if c["method"] == "dense" and c["length"] == cell["length"]
                      and c["batch"] == cell["batch"] and c["dtype"] == cell["dtype"]), None)
        for _, key, _ in COLUMNS:
            if dense is not None and key in cell and key in dense and dense[key]["median"]:
                cell[key]["ratio"] = cell[key]["median"] / dense[key]["median"]
    return sorted(summary, key=lambda c: (c["length"], c["batch"], c["dtype"], c["method"] != "dense", c["label"]))


def _fmt(key: str, value: float) -> str:
    if key.endswith("bytes"):
        return f"{value / 2**20:.1f} MiB"
    if key == "draft_share":
        return f"{value:.0%}"
    if key == "decode_ms_per_token":
        return f"{value:.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def table(summary: list[dict]) -> str:
    """The markdown table: each figure as median [min-max] (ratio to dense)."""
    head = ["length", "batch", "dtype", "method", *[name for name, _, _ in COLUMNS], "answer ok", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in summary:
        values = []
        for _, key, _ in COLUMNS:
            figure = cell.get(key)
            if figure is None:
                values.append("-")
                continue
            text = _fmt(key, figure["median"])
            if figure["min"] != figure["max"]:
                text += f" [{_fmt(key, figure['min'])}-{_fmt(key, figure['max'])}]"
            if "ratio" in figure and key != "draft_share":
                text += f" ({figure['ratio']:.2f})"
            values.append(text)
        repeats = cell.get("repeats", 0)
        ok = f"{cell.get('correct', 0)}/{repeats}" if repeats else "-"
        errors = f" error: {cell['errors'][0]}" if cell["errors"] else ""
        runs = f"{repeats} (probe)" if cell.get("timed_in_probe") else str(repeats)
        lines.append("| " + " | ".join([str(cell.get("prompt_tokens", cell["length"])), str(cell["batch"]),
                                         cell["dtype"] or "-", cell["label"] + errors, *values, ok, runs]) + " |")
    return "\n".join(lines)


def targets(summary: list[dict]) -> list[str]:
    """The issue's targets, checked on the longest length measured, batch 1, per dtype measured."""
    dtypes = sorted({c["dtype"] for c in summary})
    lines = []
    for dtype in dtypes:
        mine = [c for c in summary if c["dtype"] == dtype]
        lines += [line if len(dtypes) == 1 else f"- [{dtype or 'dtype not recorded'}]{line[1:]}"
                  for line in _targets(mine)]
    return lines


def _targets(summary: list[dict]) -> list[str]:
    lines = []
    ones = [c for c in summary if c["batch"] == 1 and c.get("repeats")]
    longest = max((c["length"] for c in ones), default=0)

    def cell(method: str, length: int = longest) -> dict | None:
        return next((c for c in ones if c["method"] == method and c["length"] == length), None)

    if (c := cell("specpc")) and "ratio" in c.get("ttft_s", {}):
        r = c["ttft_s"]["ratio"]
        lines.append(f"- SpecPC time to first token at {c['prompt_tokens']} tokens: {r:.2f} of dense "
                     f"(target <= 0.25: {'met' if r <= 0.25 else 'missed'})")
    if (c := cell("speckv-pc")) and "ratio" in c.get("e2e_s", {}):
        r = c["e2e_s"]["ratio"]
        lines.append(f"- SpecKV-PC end-to-end at {c['prompt_tokens']} tokens: {r:.2f} of dense "
                     f"(target <= 0.4: {'met' if r <= 0.4 else 'missed'})")
    for c in [c for c in ones if c["length"] == longest and "peak_memory_total_bytes" in c]:
        peak = c["peak_memory_total_bytes"]["median"] / 2**30
        lines.append(f"- {c['label']} peak resident memory at {c['prompt_tokens']} tokens: {peak:.1f} GiB "
                     f"(target <= 16 GB: {'met' if peak * 2**30 <= 16e9 else 'missed'})")
    for c in [c for c in ones if c["method"] == "speckv"]:
        stored, dense = c["kv_bytes_stored"], c["kv_bytes_dense"]
        want = min(c["params"]["budget"], c["prompt_tokens"]) / c["prompt_tokens"]
        error = abs(stored / dense - want) / want
        timings = c["timings"]
        scoring = timings.get("scoring", 0.0) / timings["target_prefill"] if timings.get("target_prefill") else 0.0
        probe = timings.get("probe", 0.0) / timings["target_prefill"] if timings.get("target_prefill") else 0.0
        lines.append(f"- {c['label']} at {c['prompt_tokens']} tokens: cache tensors hold {stored / dense:.4f} of dense's "
                     f"KV bytes, budget / prompt "
                     f"= {want:.4f} (off by {error:.2%}; target within 1%: {'met' if error <= 0.01 else 'missed'}); "
                     f"scoring {scoring:.1%} of the target prefill (target <= 5%: "
                     f"{'met' if scoring <= 0.05 else 'missed'}), the lookahead probe another {probe:.1%}")
    for c in [c for c in summary if c["method"] == "speckv" and c.get("target_stage_peak_bytes")]:
        dense = next((d for d in summary if d["method"] == "dense" and d["length"] == c["length"]
                      and d["batch"] == c["batch"] and d["dtype"] == c["dtype"]
                      and d.get("target_stage_peak_bytes")), None)
        if dense is not None:
            r = c["target_stage_peak_bytes"] / dense["target_stage_peak_bytes"]
            whole = c["peak_memory_bytes"].get("ratio", float("nan"))
            size = f"{c['prompt_tokens']} tokens" if "prompt_tokens" in c else f"length {c['length']}"
            lines.append(f"- SpecKV target-stage peak memory at {size} x{c['batch']}: {r:.3f} of dense's "
                         f"(target <= 1: {'met' if r <= 1 else 'missed'}); with its draft pass {whole:.3f}")
    return lines


def plots(summary: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    several = len({c["dtype"] for c in summary}) > 1

    def series(c: dict) -> str:  # one line per setting, and per dtype where the run measured several
        return f"{c['label']} [{c['dtype'] or '?'}]" if several else c["label"]

    ones = [c for c in summary if c["batch"] == min(c2["batch"] for c2 in summary)]
    labels = sorted({series(c) for c in ones}, key=lambda label: (not label.startswith("dense"), label))
    styles = line_styles(sorted({series(c) for c in summary}))
    for name, panels in (("latency.png", [("ttft_s", "time to first token (s)"), ("e2e_s", "end-to-end (s)"),
                                          ("decode_ms_per_token", "decode (ms / token)")]),
                         ("memory.png", [("peak_memory_total_bytes", "peak resident memory (MiB)"),
                                         ("peak_memory_bytes", "peak memory above weights (MiB)"),
                                         ("kv_bytes", "KV cache after compression (MiB)")])):
        figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
        for axis, (key, title) in zip(axes, panels, strict=True):
            for label in labels:
                points = sorted((c["length"], c[key]["median"]) for c in ones if series(c) == label and key in c)
                if points:
                    scale = 2**20 if key.endswith("bytes") else 1
                    axis.plot([p[0] for p in points], [p[1] / scale for p in points], label=label, **styles[label])
            axis.set_xlabel("context length (tokens)")
            axis.set_title(title)
            axis.set_xscale("log", base=2)
            axis.grid(alpha=0.3)
        if not any(axis.lines for axis in axes):  # e.g. the latency of a memory-only run
            plt.close(figure)
            continue
        next(axis for axis in axes if axis.lines).legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / name, dpi=120)
        plt.close(figure)
        written.append(out / name)
    batches = sorted({c["batch"] for c in summary})
    if len(batches) > 1:
        longest = max(c["length"] for c in summary)
        figure, axis = plt.subplots(figsize=(5, 4))
        for label in labels:
            points = sorted((c["batch"], c["tokens_per_s"]["median"]) for c in summary
                            if series(c) == label and c["length"] == longest and "tokens_per_s" in c)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], label=label, **styles[label])
        axis.set_xlabel("batch size")
        axis.set_title(f"throughput at {longest} tokens (new tokens / s)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(out / "throughput.png", dpi=120)
        plt.close(figure)
        written.append(out / "throughput.png")
    return written


def report(out: Path, config: dict | None = None) -> tuple[Path, list[dict]]:
    """bench.json (config, summary) and bench.md (the table and the targets) from `out/runs.jsonl`, with plots."""
    rows = read_rows(out / "runs.jsonl")
    if not rows:
        raise ConfigError(f"no benchmark runs in {out / 'runs.jsonl'}")
    with writing(f"the benchmark report into {out}", "runs.jsonl is untouched; free space and run the same "
                 "command again (it measures nothing more)"):
        return write_report(out, rows, config)


def write_report(out: Path, rows: list[dict], config: dict | None) -> tuple[Path, list[dict]]:
    summary = summarize(rows)
    (out / "bench.json").write_text(json.dumps({"config": config, "summary": summary}, indent=1) + "\n",
                                    encoding="utf-8")
    legend = "\n".join(f"- **{name}**: {meaning}" for name, _, meaning in COLUMNS)
    text = ("Each figure: median [min-max] of the repeats (ratio to dense, same length and batch, same run); "
            "n \"1 (probe)\": no timed repeat, the figures of the memory probe's one run (a fresh process).\n\n"
            + table(summary) + "\n\n" + legend + "\n")
    checks = targets(summary)
    if checks:
        text += "\nTargets:\n\n" + "\n".join(checks) + "\n"
    (out / "bench.md").write_text(text, encoding="utf-8")
    plots(summary, out)
    return out / "bench.md", summary


if __name__ == "__main__":  # the memory probe's subprocess
    print(json.dumps(memory_probe(json.loads(sys.argv[1]))))
