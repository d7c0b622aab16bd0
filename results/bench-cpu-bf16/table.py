"""The tables of this folder's README from runs.jsonl: per prompt length, each method's figures in
bfloat16 (the median of timed repeats where there are any, else the memory probe's one fresh-process run)
with its ratio to dense; then float32 against bfloat16 at 2k and 8k, the probe's run of each (the same
kind of run in both dtypes). Run from the repository root: python results/bench-cpu-bf16/table.py"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).parent
ORDER = ["dense", "snapkv", "speckv", "specpc", "speckv-pc"]
NAMES = {"dense": "dense", "snapkv": "SnapKV@256", "speckv": "SpecKV@256", "specpc": "SpecPC@1024",
         "speckv-pc": "SpecKV-PC@256/1024"}

rows = [json.loads(line) for line in (HERE / "runs.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]
rows = [row for row in rows if "error" not in row]
timed, probes = defaultdict(list), {}
for row in rows:
    key = (row["dtype"], row["length"], row["method"])
    if row["repeat"] >= 0:
        timed[key].append(row)
    else:
        probes[key] = row


def figures(dtype: str, length: int, method: str, probe_only: bool = False) -> dict | None:
    runs = [] if probe_only else timed.get((dtype, length, method), [])
    probe = probes.get((dtype, length, method))
    source = runs or ([probe] if probe is not None and "e2e_s" in probe else [])
    if not source:
        return None
    median = {key: statistics.median(run[key] for run in source)
              for key in ("ttft_s", "e2e_s", "decode_ms_per_token", "kv_bytes")}
    median["runs"] = f"{len(runs)}" if runs else "1 (probe)"
    median["peak"] = probe["peak_memory_total_bytes"] if probe is not None else None
    median["prompt"] = source[0]["prompt_tokens"]
    median["correct"] = sum(run["correct"] for run in source)
    return median


def gib(value: float | None) -> str:
    return f"{value / 2**30:.2f} GiB" if value is not None else "-"


print("| prompt | method | TTFT | end to end | decode ms/token | KV after compression | peak resident | "
      "answer ok | runs |")
print("|---|---|---|---|---|---|---|---|---|")
for length in sorted({row["length"] for row in rows if row["dtype"] == "bfloat16"}):
    dense = figures("bfloat16", length, "dense")
    for method in ORDER:
        cell = figures("bfloat16", length, method)
        if cell is None:
            continue
        def ratio(key: str, c: dict = cell, base: dict | None = dense) -> str:
            return f" ({c[key] / base[key]:.2f})" if base else ""

        print(f"| {cell['prompt']:,} | {NAMES[method]} | {cell['ttft_s']:.1f} s{ratio('ttft_s')} | "
              f"{cell['e2e_s']:.1f} s{ratio('e2e_s')} | {cell['decode_ms_per_token']:.0f}{ratio('decode_ms_per_token')} | "
              f"{cell['kv_bytes'] / 2**20:.1f} MiB | {gib(cell['peak'])} | {cell['correct']}/{cell['runs'][0]} | "
              f"{cell['runs']} |")

print("\nfloat32 against bfloat16, each the memory probe's one fresh-process run:\n")
print("| prompt | method | TTFT f32 / bf16 | end to end f32 / bf16 | decode ms/token f32 / bf16 | "
      "peak resident f32 / bf16 | answer |")
print("|---|---|---|---|---|---|---|")
for length in sorted({row["length"] for row in rows if row["dtype"] == "float32"}):
    for method in ORDER:
        old, new = figures("float32", length, method, True), figures("bfloat16", length, method, True)
        if old is None or new is None:
            continue
        same = probes[("float32", length, method)]["answer"] == probes[("bfloat16", length, method)]["answer"]
        print(f"| {new['prompt']:,} | {NAMES[method]} | {old['ttft_s']:.1f} / {new['ttft_s']:.1f} s "
              f"({new['ttft_s'] / old['ttft_s']:.2f}) | {old['e2e_s']:.1f} / {new['e2e_s']:.1f} s "
              f"({new['e2e_s'] / old['e2e_s']:.2f}) | {old['decode_ms_per_token']:.0f} / "
              f"{new['decode_ms_per_token']:.0f} ({new['decode_ms_per_token'] / old['decode_ms_per_token']:.2f}) | "
              f"{gib(old['peak'])} / {gib(new['peak'])} | {'same' if same else 'differs'} |")
