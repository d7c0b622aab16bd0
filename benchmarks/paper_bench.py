"""The paper's regime on a GPU, with random-weight models built in memory from configs (issue 19).

    # (a) one model pair, each decode backend, into OUT/a-eager and OUT/a-static
    python benchmarks/paper_bench.py run --target DIR_OR_CONFIG --draft DIR_OR_CONFIG --tokenizer DIR \
        --decode eager,static --lengths 8192,32768 --batch-sizes 1,8 --methods dense,speckv,specpc,speckv-pc --out OUT/a
    # the combined tables, targets and plot of every run folder given
    python benchmarks/paper_bench.py report OUT/a-eager OUT/a-static OUT/b-static --out results/bench-gpu-paper

No weights are read or written (a 14B model would take 30 GB of disk and a minute each way): the
models are initialised on the device from their configs, with the tokenizer of `--tokenizer`. Time
and memory depend on the shapes only, never the answers: never read accuracy from these runs.
`benchmarks/gpu_paper_regime.sh` runs the whole measurement, and rehearses it on a CPU.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from random_weights import load_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from draftkv import bench
from draftkv.models import pair_from_models, parse_speculate

TARGETS = {"decode_ms": 8.0, "speckv_ttft_ratio": 1.15, "specpc_vs_laq": 0.25, "specpc_vs_dense": 0.5,
           "memory_below_laq_gb": 25.0}


def build(source: Path, overrides: list[str], device: str, dtype: str) -> torch.nn.Module:
    config = load_config(source, overrides)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval().requires_grad_(False)


def run(args: argparse.Namespace) -> None:
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    target = build(args.target, args.override, args.device, args.dtype)
    draft = build(args.draft, args.override, args.device, args.dtype)
    methods = bench.method_configs(args.methods.split(","), args.budget, args.prompt_budget)
    lengths = [int(n) for n in args.lengths.split(",")]
    batches = [int(n) for n in args.batch_sizes.split(",")]
    speculate = [parse_speculate(n) for n in args.speculate.split(",")]
    for decode in args.decode.split(","):
        pair = pair_from_models(target, tokenizer, draft, tokenizer, decode=decode)
        out = Path(f"{args.out}-{decode}")
        config = {"target": str(args.target), "draft": str(args.draft), "decode": decode, "lengths": lengths,
                  "batch_sizes": batches, "methods": methods, "new_tokens": args.new_tokens, "repeats": args.repeats,
                  "speculate": speculate,
                  "device": str(target.device), "dtype": args.dtype, "overrides": args.override,
                  "target_parameters": sum(p.numel() for p in target.parameters()),
                  "draft_parameters": sum(p.numel() for p in draft.parameters()),
                  "environment": bench.measurement_environment()}
        bench.run_bench(pair, out, lengths=lengths, methods=methods, batch_sizes=batches, new_tokens=args.new_tokens,
                        repeats=args.repeats, speculate=speculate)
        if pair.call_costs is not None:  # what `auto` measured, and chose from
            costs = pair.call_costs
            config["speculation_costs"] = {"target_ms": {width: 1e3 * s for width, s in costs.target.items()},
                                           "draft_step_ms": 1e3 * costs.draft_step,
                                           "acceptance": costs.acceptance, "summary": costs.summary()}
        bench.report(out, config)
        print(f"{out}: done")


def cells(folder: Path) -> tuple[dict, list[dict]]:
    data = json.loads((folder / "bench.json").read_text(encoding="utf-8"))
    return data["config"], data["summary"]


def median(cell: dict | None, key: str) -> float | None:
    return cell[key]["median"] if cell is not None and key in cell else None


def find(summary: list[dict], method: str, length: int, batch: int = 1) -> dict | None:
    return next((c for c in summary if c["method"] == method and c["length"] == length and c["batch"] == batch), None)


def ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}" if value is not None and base else "-"


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {folder.name: cells(folder) for folder in args.folders}
    lines = ["Medians of the repeats. Ratios are to dense (or LAQ++) at the same length and batch, in the same "
             "run folder.", ""]
    checks = []
    combined = {}
    for name, (config, summary) in runs.items():
        params = f"{config['target_parameters'] / 1e9:.2f}B target, {config['draft_parameters'] / 1e9:.2f}B draft"
        lines += [f"## {name}: decode {config['decode']}, {params}, {config['dtype']} on {config['device']}", "",
                  "| prompt tokens | batch | method | TTFT s (x dense) | decode ms/tok | end-to-end s (x dense, x LAQ++) "
                  "| peak memory GiB (- LAQ++) |", "|---|---|---|---|---|---|---|"]
        for cell in summary:
            dense = find(summary, "dense", cell["length"], cell["batch"])
            laq = find(summary, "laq", cell["length"], cell["batch"])
            ttft, e2e = median(cell, "ttft_s"), median(cell, "e2e_s")
            memory = median(cell, "peak_memory_bytes")
            below = (f"{(median(laq, 'peak_memory_bytes') - memory) / 2**30:+.1f}"
                     if laq is not None and memory is not None and median(laq, "peak_memory_bytes") is not None else "-")
            lines.append(f"| {cell.get('prompt_tokens', cell['length']):,} | {cell['batch']} | {cell['label']} | "
                         f"{fmt(ttft)} ({ratio(ttft, median(dense, 'ttft_s'))}) | "
                         f"{fmt(median(cell, 'decode_ms_per_token'), 1)} | {fmt(e2e)} ({ratio(e2e, median(dense, 'e2e_s'))}, "
                         f"{ratio(e2e, median(laq, 'e2e_s'))}) | {fmt(memory / 2**30 if memory else None)} ({below}) |")
            combined[f"{name}|{cell['length']}|{cell['batch']}|{cell['label']}"] = {
                "ttft_s": ttft, "e2e_s": e2e, "decode_ms_per_token": median(cell, "decode_ms_per_token"),
                "peak_memory_bytes": memory}
        lines.append("")
        longest = max(c["length"] for c in summary)
        decode_1 = median(find(summary, "dense", min(c["length"] for c in summary)), "decode_ms_per_token")
        if decode_1 is not None:
            checks.append(f"- {name}: dense batch-1 decode {decode_1:.1f} ms per token "
                          f"(target at most {TARGETS['decode_ms']:.0f} for the 1.5B)")
        for length in sorted({c["length"] for c in summary}):
            speckv, dense = find(summary, "speckv", length), find(summary, "dense", length)
            if median(speckv, "ttft_s") and median(dense, "ttft_s"):
                checks.append(f"- {name}: SpecKV TTFT {median(speckv, 'ttft_s') / median(dense, 'ttft_s'):.2f}x dense "
                              f"at {length:,} (target at most {TARGETS['speckv_ttft_ratio']} at 32k, embedded pair)")
        both, laq, dense = (find(summary, m, longest) for m in ("speckv-pc", "laq", "dense"))
        if median(both, "e2e_s") and median(laq, "e2e_s") and median(dense, "e2e_s"):
            gap = (median(laq, "peak_memory_bytes") or 0) - (median(both, "peak_memory_bytes") or 0)
            checks.append(f"- {name}: SpecKV-PC end to end {median(both, 'e2e_s') / median(laq, 'e2e_s'):.2f}x LAQ++ "
                          f"(target at most {TARGETS['specpc_vs_laq']}) and {median(both, 'e2e_s') / median(dense, 'e2e_s'):.2f}x "
                          f"dense (at most {TARGETS['specpc_vs_dense']}) at {longest:,}; peak memory {gap / 1e9:.1f} GB below "
                          f"LAQ++ (target at least {TARGETS['memory_below_laq_gb']:.0f})")
    lines += ["## Targets", "", *checks, ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.md").write_text("\n".join(lines), encoding="utf-8")
    (args.out / "bench.json").write_text(json.dumps({"runs": {n: c for n, (c, _) in runs.items()}, "cells": combined},
                                                    indent=1) + "\n", encoding="utf-8")
    figure, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 4), squeeze=False)
    for axis, (name, (_, summary)) in zip(axes[0], runs.items(), strict=True):
        ones = [c for c in summary if c["batch"] == 1]
        labels = sorted({c["method"] for c in ones}, key=lambda m: (m != "dense", m))
        lengths = sorted({c["length"] for c in ones})
        width = 0.8 / max(len(lengths), 1)
        for index, length in enumerate(lengths):
            values = [median(find(ones, label, length), "e2e_s") or 0 for label in labels]
            axis.bar([i + index * width for i in range(len(labels))], values, width, label=f"{length:,} tokens")
        axis.set_xticks([i + width * (len(lengths) - 1) / 2 for i in range(len(labels))], labels, rotation=30,
                        ha="right")
        axis.set_ylabel("end to end, s (batch 1)")
        axis.set_title(name)
        axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "paper.png", dpi=120)
    print((args.out / "bench.md").read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("run", help="measure one model pair with each decode backend")
    measure.add_argument("--target", type=Path, required=True, help="a model folder or a config JSON file")
    measure.add_argument("--draft", type=Path, required=True, help="a model folder or a config JSON file")
    measure.add_argument("--tokenizer", type=Path, required=True, help="a folder with the pair's tokenizer files")
    measure.add_argument("--override", action="append", default=[], help="key=value over both configs (rehearsals)")
    measure.add_argument("--decode", default="auto", help="decode backends, comma-separated (eager, static, auto)")
    measure.add_argument("--lengths", default="8192,32768")
    measure.add_argument("--batch-sizes", default="1")
    measure.add_argument("--methods", default="dense,snapkv,speckv,specpc,speckv-pc")
    measure.add_argument("--budget", type=int, default=256)
    measure.add_argument("--prompt-budget", type=int, default=1024)
    measure.add_argument("--new-tokens", type=int, default=32)
    measure.add_argument("--speculate", default="0", help="draft proposals per target call, comma-separated (0: none; "
                                                          "auto: as measured)")
    measure.add_argument("--repeats", type=int, default=2)
    measure.add_argument("--device", default="cuda")
    measure.add_argument("--dtype", default="bfloat16")
    measure.add_argument("--out", type=Path, required=True, help="folder prefix: one folder per backend, OUT-<decode>")
    combine = commands.add_parser("report", help="the combined tables, targets and plot of run folders")
    combine.add_argument("folders", type=Path, nargs="+")
    combine.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    {"run": run, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
