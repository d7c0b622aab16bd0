"""The reference side of benchmarks/kvzip_reference.py, run in an environment with kvpress 0.5.5 (and no
draftkv): its KVzipPress on the target folder and the token ids of prompts.json, as kvpress's pipeline runs
it (the context prefilled under the press, the question read after it, greedy answers over the masked
cache). Writes kvpress.jsonl.gz: per prompt and compression ratio, as each finishes, the pruned (layer, KV
head, position) entries and the answer; a rerun skips the runs recorded.

    python benchmarks/kvzip_kvpress.py --model ~/.cache/draftkv/models/qwen2.5-coder-1.5b-instruct \\
        --dir results/kvzip-reference [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import torch
from kvpress import KVzipPress
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache


def greedy(model, question_ids: list[int], cache: DynamicCache, start: int, new_tokens: int) -> list[int]:
    """kvpress's generate_answer: the question after the context, then greedy tokens to an end-of-turn."""
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    ids = torch.tensor([question_ids])
    positions = torch.arange(start, start + ids.shape[1])[None]
    out = model(input_ids=ids, past_key_values=cache, position_ids=positions, logits_to_keep=1)
    answer = [int(out.logits[0, -1].argmax())]
    position = start + ids.shape[1]
    while len(answer) < new_tokens and answer[-1] not in stops:
        out = model(input_ids=torch.tensor([[answer[-1]]]), past_key_values=cache,
                    position_ids=torch.tensor([[position]]))
        answer.append(int(out.logits[0, -1].argmax()))
        position += 1
    return answer[:-1] if answer[-1] in stops else answer


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    given = json.loads((args.dir / "prompts.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 attn_implementation="sdpa")
    model.config.name_or_path = str(args.model)  # KVzipPress reads the tokenizer from here
    import kvpress
    import transformers

    out = args.dir / "kvpress.jsonl.gz"
    done = set()
    if out.is_file():
        with gzip.open(out, "rt", encoding="utf-8") as file:
            done = {(row["id"], row["ratio"]) for row in map(json.loads, file)}
    for prompt in given["prompts"]:
        for ratio in given["ratios"]:
            if (prompt["id"], ratio) in done:
                continue
            started = time.perf_counter()
            cache = DynamicCache()
            ids = torch.tensor([prompt["context_ids"]])
            with KVzipPress(compression_ratio=ratio)(model):
                model.model(input_ids=ids, past_key_values=cache)
            layers = model.model.layers
            pruned = [layer.self_attn.masked_key_indices for layer in layers]
            answer = greedy(model, prompt["question_ids"], cache, ids.shape[1], given["new_tokens"])
            for layer in layers:  # the next run starts unmasked
                layer.self_attn.masked_key_indices = None
            row = {"id": prompt["id"], "ratio": ratio, "layers": len(layers), "heads": model.config.num_key_value_heads,
                   "pruned": [sum(([layer] * len(p[1]) for layer, p in enumerate(pruned)), []),
                              torch.cat([p[1] for p in pruned]).tolist(), torch.cat([p[2] for p in pruned]).tolist()],
                   "answer": tokenizer.decode(answer, skip_special_tokens=True),
                   "seconds": time.perf_counter() - started, "dtype": args.dtype,
                   "versions": {"kvpress": getattr(kvpress, "__version__", "0.5.5"),
                                "transformers": transformers.__version__, "torch": torch.__version__}}
            with gzip.open(out, "at", encoding="utf-8") as file:
                file.write(json.dumps(row) + "\n")
            print(f"{prompt['id']} ratio {ratio}: {row['answer']!r} ({row['seconds']:.0f} s)", flush=True)

if __name__ == "__main__":
    main()
