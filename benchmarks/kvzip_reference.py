"""draftkv's KVzip against its reference, kvpress 0.5.5's KVzipPress, on the embedded target and the same
token ids: which (layer, KV head, position) entries each keeps, and the answers, at kvpress's compression
ratios (the share removed). Three steps, two environments (kvpress pins its own transformers):

    python benchmarks/kvzip_reference.py prompts --out results/kvzip-reference
    <kvpress venv>/bin/python benchmarks/kvzip_kvpress.py --model <target folder> --dir results/kvzip-reference
    (writes kvpress.jsonl.gz, resumable)
    python benchmarks/kvzip_reference.py compare --dir results/kvzip-reference

`results/kvzip-reference/run.sh` runs all three (and makes the kvpress environment).
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_2")  # where the old probe lost to kvpress's
RATIOS = (0.5, 0.75)
LENGTH = 4096
NEW_TOKENS = 32


def prompts(out: Path) -> None:
    """The prompts as token ids: each RULER sample's context as draftkv's query-agnostic mode prefills it
    (the chat template's head, the context; the question not yet known), and its question as `ask` reads it."""
    import draftkv
    from draftkv.context import split_template
    from draftkv.eval.ruler import generate

    pair = draftkv.load_pair(draft=None)
    tokenizer = pair.tokenizer
    rows = []
    for task in TASKS:
        sample = generate(task, LENGTH, tokenizer, samples=1, seed=0)[0]
        head, tail = split_template(tokenizer, sample.context, None, True)
        question = sample.question + tail + sample.answer_prefix
        rows.append({"id": sample.id, "answers": sample.answers, "context": sample.context,
                     "question": sample.question, "answer_prefix": sample.answer_prefix,
                     "context_ids": tokenizer(head, add_special_tokens=False)["input_ids"],
                     "question_ids": tokenizer(question, add_special_tokens=False)["input_ids"]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps({"target": pair.target.model.config.name_or_path, "ratios": RATIOS,
                                                  "new_tokens": NEW_TOKENS, "prompts": rows}), encoding="utf-8")
    print(f"wrote {out / 'prompts.json'}: {len(rows)} prompts of {[len(r['context_ids']) for r in rows]} tokens")


def compare(folder: Path) -> None:
    """Ours on the same ids, then the overlap with kvpress's kept entries and the answers, per prompt and ratio."""
    import torch

    import draftkv

    given = json.loads((folder / "prompts.json").read_text(encoding="utf-8"))
    with gzip.open(folder / "kvpress.jsonl.gz", "rt", encoding="utf-8") as file:
        reference = {(row["id"], row["ratio"]): row for row in map(json.loads, file)}
    dtype = next(iter(reference.values()))["dtype"]
    pair = draftkv.load_pair(draft=None, dtype=dtype)
    rows = []
    for prompt in given["prompts"]:
        ratios = [ratio for ratio in given["ratios"] if (prompt["id"], ratio) in reference]  # kvpress's so far
        methods = [draftkv.get_method("kvzip", compression_ratio=ratio) for ratio in ratios]
        for index, compressed in draftkv.compress_context_each(pair, prompt["context"], methods) if methods else []:
            ratio = ratios[index]
            ids = compressed.prepared.prompts[0].ids
            if ids != prompt["context_ids"]:
                raise SystemExit(f"{prompt['id']}: draftkv's context ids differ from the ones kvpress read")
            run = reference[prompt["id"], ratio]
            ours = torch.zeros(run["layers"], run["heads"], len(ids), dtype=torch.bool)
            for layer, kept in enumerate(compressed.prepared.kept_rows[0]):
                for head, positions in enumerate(kept):
                    ours[layer, head, positions[positions >= 0]] = True
            kept_theirs = torch.ones_like(ours)
            kept_theirs[run["pruned"][0], run["pruned"][1], run["pruned"][2]] = False
            answer = compressed.ask(prompt["question"], answer_prefix=prompt["answer_prefix"],
                                    max_new_tokens=given["new_tokens"])
            both = int((ours & kept_theirs).sum())
            rows.append({"id": prompt["id"], "ratio": ratio, "entries": int(ours.numel()),
                         "kept_ours": int(ours.sum()), "kept_kvpress": int(kept_theirs.sum()),
                         "overlap": both / int(kept_theirs.sum()),
                         "per_layer_ours": ours.sum(dim=(1, 2)).tolist(),
                         "per_layer_kvpress": kept_theirs.sum(dim=(1, 2)).tolist(),
                         "answer_ours": answer.text, "answer_kvpress": run["answer"],
                         "same_answer": answer.text.strip() == run["answer"].strip(), "answers": prompt["answers"]})
            print(f"{prompt['id']} ratio {ratio}: overlap {rows[-1]['overlap']:.4f}, answers "
                  f"{'equal' if rows[-1]['same_answer'] else 'differ'}: {answer.text!r} / {run['answer']!r}")
    (folder / "compare.json").write_text(json.dumps({"dtype": dtype, "rows": rows}, indent=1),
                                         encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("prompts").add_argument("--out", type=Path, required=True)
    steps.add_parser("compare").add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    if args.step == "prompts":
        prompts(args.out)
    else:
        compare(args.dir)


if __name__ == "__main__":
    main()
