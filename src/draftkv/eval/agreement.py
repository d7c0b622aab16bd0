"""Does the draft see what the target sees? The paper's premise, measured.

For each sample the target's own greedy answer is the oracle lookahead: the window queries plus
that answer give the oracle importance of every prompt entry. SpecKV estimates it with the draft's
lookahead instead, SnapKV with the window alone. Per layer we report the Spearman rank correlation of
each estimate with the oracle (mean over KV heads) and the recall of the oracle's top-C set (the
entries a budget of C + window would keep by score).

All three run through the executor as consumers of one target prefill: SnapKV, SpecKV, and SpecKV
with the target as its own guesser (the oracle, decoded from a copy of the full cache); each guess
is read as a probe on the same cache.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..engine.scoring import pool_scores
from ..flow import prepare
from ..jsonl import drop_torn_tail, exclusive, read_rows, writing
from ..methods import get_method
from ..progress import progress_bar
from .ruler import Sample

if TYPE_CHECKING:
    from ..models import ModelPair


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation of two score vectors."""
    rank_a = a.argsort().argsort().double()
    rank_b = b.argsort().argsort().double()
    rank_a, rank_b = rank_a - rank_a.mean(), rank_b - rank_b.mean()
    return float((rank_a * rank_b).sum() / (rank_a.norm() * rank_b.norm()).clamp(min=1e-12))


def recall(oracle: torch.Tensor, estimate: torch.Tensor, top: int) -> float:
    """Share of the oracle's top-`top` entries that the estimate's top-`top` also holds."""
    top = min(top, oracle.numel())
    wanted = set(oracle.topk(top).indices.tolist())
    return len(wanted & set(estimate.topk(top).indices.tolist())) / top


@torch.inference_mode()
def sample_agreement(pair: ModelPair, sample: Sample, *, budget: int = 128, window: int = 32, kernel: int = 7,
                     max_lookahead: int = 128) -> list[dict]:
    """Per layer: correlation and top-C recall of SpecKV's and SnapKV's importance with the oracle's."""
    request = sample.request()
    common = {"budget": budget, "window": window, "kernel": kernel}
    methods = [get_method("snapkv", **common), get_method("speckv", **common, max_lookahead=max_lookahead),
               get_method("speckv", **common, guesser="target", lookahead=request.max_new_tokens)]
    snap, spec, oracle = prepare(pair, [request], methods, answers=False)
    answer = oracle.guess.lengths[0] if oracle.guess is not None else 0
    rows = []
    chosen = budget - window
    for layer, (o, s, n) in enumerate(zip(oracle.layer_scores, spec.layer_scores, snap.layer_scores, strict=True)):
        o, s, n = (pool_scores(x[0].float(), kernel, "max") for x in (o, s, n))
        heads = range(o.shape[0])
        rows.append({
            "sample": sample.id, "task": sample.task, "length": sample.length, "layer": layer, "answer_tokens": answer,
            "lookahead_tokens": spec.draft.lengths[0] if spec.draft is not None else 0,
            "speckv_spearman": sum(spearman(o[h], s[h]) for h in heads) / len(heads),
            "snapkv_spearman": sum(spearman(o[h], n[h]) for h in heads) / len(heads),
            "speckv_recall": sum(recall(o[h], s[h], chosen) for h in heads) / len(heads),
            "snapkv_recall": sum(recall(o[h], n[h], chosen) for h in heads) / len(heads),
        })
    return rows


METRICS = ("speckv_spearman", "snapkv_spearman", "speckv_recall", "snapkv_recall")


def run_agreement(pair: ModelPair, samples: list[Sample], out: Path, *, budget: int = 128) -> Path:
    """Per-layer rows of every sample to `rows.jsonl` (resumable per sample), then table and plot."""
    path = out / "rows.jsonl"
    with writing(f"the agreement rows to {path}", "the samples already written are kept, and the same command "
                 "resumes after them"), exclusive(out):
        drop_torn_tail(path)
        done = {row.get("sample") for row in read_rows(path)}
        todo = [sample for sample in samples if sample.id not in done]
        with open(path, "a", encoding="utf-8") as handle, progress_bar() as progress:
            task = progress.add_task(f"{len(samples) - len(todo)} done before", total=len(todo))
            for sample in todo:
                progress.update(task, description=sample.task)
                handle.write("".join(json.dumps(row) + "\n" for row in sample_agreement(pair, sample, budget=budget)))
                handle.flush()  # a sample's rows land together: a killed run leaves at most a torn last line
                os.fsync(handle.fileno())
                progress.advance(task)
    with writing(f"the agreement report into {out}", "rows.jsonl is untouched"):
        return summarize(out)


def summarize(out: Path) -> Path:
    rows = read_rows(out / "rows.jsonl")
    by_layer: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_layer[row["layer"]].append(row)
    layers = sorted(by_layer)
    means = {layer: {m: sum(r[m] for r in by_layer[layer]) / len(by_layer[layer]) for m in METRICS} for layer in layers}
    overall = {m: sum(means[layer][m] for layer in layers) / len(layers) for m in METRICS}
    samples = len({row["sample"] for row in rows})
    lines = [f"Oracle = the target's own answer as lookahead; {samples} samples; mean over KV heads and samples.", "",
             "| layer | SpecKV rank corr. | SnapKV rank corr. | SpecKV top-C recall | SnapKV top-C recall |",
             "|---|---|---|---|---|"]
    lines += [f"| {layer} | " + " | ".join(f"{means[layer][m]:.3f}" for m in METRICS) + " |" for layer in layers]
    lines.append("| **all** | " + " | ".join(f"**{overall[m]:.3f}**" for m in METRICS) + " |")
    (out / "agreement.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with open(out / "agreement.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["layer", *METRICS])
        writer.writerows([layer, *(f"{means[layer][m]:.4f}" for m in METRICS)] for layer in layers)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for axis, kind, title in ((left, "spearman", "rank correlation with the oracle"),
                              (right, "recall", "recall of the oracle's top-C")):
        for method in ("speckv", "snapkv"):
            axis.plot(layers, [means[layer][f"{method}_{kind}"] for layer in layers], marker="o",
                      label="SpecKV (draft lookahead)" if method == "speckv" else "SnapKV (window only)")
        axis.set_xlabel("layer")
        axis.set_title(title)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "agreement.png", dpi=120)
    plt.close(figure)
    return out / "agreement.md"
