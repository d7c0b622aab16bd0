"""The dtype a model runs in. `auto` takes the fastest the device measures: bfloat16 on CUDA; on a CPU,
bfloat16 where its matrix products are measured faster than float32's (CPUs with bfloat16 matrix units:
Intel AMX, AVX512-BF16 on Intel and AMD Zen 4/5, ARM's BF16), float32 elsewhere.

The CPU's answer is timed once per machine, torch version and thread count (a prefill-shaped and a
decode-shaped product in both dtypes, about a second) and kept beside the model cache
(`cpu-dtype.json`), so every later load reads it. The CPU's flags shortcut the timing where they settle
it: AMX's bfloat16 tiles are always faster, and an x86 CPU without bfloat16 instructions emulates them.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..options import DTYPE_NAMES
from .embedded import CPU_DTYPE_FILE, cache_dir

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
# A prefill's and a decode step's product in a 1.5B model's MLP: 2,048 tokens, or one, by 1536 x 8960.
PREFILL_SHAPE, DECODE_SHAPE = (2048, 1536, 8960), (1, 1536, 8960)
# bfloat16 is chosen where its prefill product takes at most this share of float32's, and its decode
# product (bound by reading the weights, which bfloat16 halves) is not slower beyond timing noise.
PREFILL_GAIN, DECODE_SLACK = 0.8, 1.1


@dataclass(frozen=True)
class CpuDtype:
    """What `auto` runs in on this CPU, and why: from its flags, or from products timed on it (ms)."""

    dtype: str  # "bfloat16" or "float32"
    reason: str
    key: str  # the machine, torch version and thread count it holds for
    timings_ms: dict[str, float] | None = None  # float32 / bfloat16 x prefill / decode, where timed

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: the name the stats, rows and results use."""
    return str(dtype).removeprefix("torch.")


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """The dtype to load in: the given one, or for None and "auto" the fastest this device measures
    (bfloat16 on CUDA, `cpu_dtype()` on a CPU). A dtype given by name or as a torch dtype always wins."""
    from .loading import resolve_device

    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype is not None and not isinstance(dtype, str):
        raise ConfigError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_NAMES)}")
    name = (dtype or "auto").lower()
    if name not in DTYPE_NAMES:
        raise ConfigError(f"Unknown dtype {dtype!r}; allowed: {', '.join(DTYPE_NAMES)}")
    if name != "auto":
        return DTYPES[name]
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if resolved.type == "cpu":
        return cpu_dtype().torch_dtype
    return torch.float32  # other devices (mps, xpu): the dtype every kernel has


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (x86 `flags`, ARM `Features`); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            name, _, value = line.partition(":")
            if name.strip() in ("model name", "Model", "CPU part"):
                return value.strip()
    return platform.processor() or "unknown CPU"


def machine_key() -> str:
    """What a CPU's answer holds for: the machine, its CPU, the torch version and the thread count."""
    return f"{platform.machine()} {cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def cpu_dtype(refresh: bool = False) -> CpuDtype:
    """`auto`'s dtype on this CPU: kept from an earlier decision for this machine, else decided now (and
    kept, where the cache folder can be written). `refresh`: decide again."""
    key = machine_key()
    path = cache_dir() / CPU_DTYPE_FILE
    known = _read_choices(path)
    if not refresh and isinstance(entry := known.get(key), dict) and entry.get("dtype") in ("bfloat16", "float32"):
        return CpuDtype(entry["dtype"], entry.get("reason", ""), key, entry.get("timings_ms"))
    choice = decide(cpu_flags(), key)
    known[key] = {k: v for k, v in asdict(choice).items() if k != "key"}
    with contextlib.suppress(OSError):  # a read-only cache: decided again next time, nothing lost
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(known, indent=1) + "\n", encoding="utf-8")
        partial.replace(path)
    return choice


def _read_choices(path: Path) -> dict:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}


def decide(flags: set[str], key: str) -> CpuDtype:
    """bfloat16 or float32 on this CPU, from its flags where they settle it, else from timed products."""
    if "amx_bf16" in flags:
        return CpuDtype("bfloat16", "the CPU has AMX bfloat16 tiles (flag amx_bf16)", key)
    if platform.machine().lower() in ("x86_64", "amd64") and flags and "avx512_bf16" not in flags:
        return CpuDtype("float32", "the CPU has no bfloat16 instructions (no amx_bf16 or avx512_bf16 flag), so "
                                   "bfloat16 products would be emulated", key)
    timings = time_products()
    prefill = timings["bfloat16_prefill"] / timings["float32_prefill"]
    decode = timings["bfloat16_decode"] / timings["float32_decode"]
    faster = prefill <= PREFILL_GAIN and decode <= DECODE_SLACK
    reason = (f"timed here: bfloat16 takes {prefill:.2f} of float32's time for a prefill-shaped product and "
              f"{decode:.2f} for a decode-shaped one")
    return CpuDtype("bfloat16" if faster else "float32", reason, key, timings)


def time_products() -> dict[str, float]:
    """Milliseconds of a prefill-shaped and a decode-shaped matrix product in float32 and bfloat16: the
    median of a few runs after a warm-up, the two dtypes taking turns, so that a machine busy with other
    work slows both alike."""
    timings = {}
    generator = torch.Generator().manual_seed(0)
    for name, (rows, inner, columns), repeats in (("prefill", PREFILL_SHAPE, 5), ("decode", DECODE_SHAPE, 30)):
        left = torch.randn(rows, inner, generator=generator)
        right = torch.randn(inner, columns, generator=generator)
        operands = {dtype: (left.to(DTYPES[dtype]), right.to(DTYPES[dtype])) for dtype in ("float32", "bfloat16")}
        runs: dict[str, list[float]] = {dtype: [] for dtype in operands}
        with torch.inference_mode():
            for a, b in operands.values():
                torch.matmul(a, b)  # the kernel's first call sets it up
            for _ in range(repeats):
                for dtype, (a, b) in operands.items():
                    started = time.perf_counter()
                    torch.matmul(a, b)
                    runs[dtype].append(1000 * (time.perf_counter() - started))
        timings.update({f"{dtype}_{name}": statistics.median(times) for dtype, times in runs.items()})
    return timings
