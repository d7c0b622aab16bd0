"""A random-weight model from a config (a model folder, or a config JSON file such as those in
benchmarks/paper/) with a real tokenizer, for timing.

    python benchmarks/random_weights.py ~/.cache/draftkv/models/qwen2.5-coder-1.5b-instruct /tmp/target --device cuda
    python benchmarks/random_weights.py benchmarks/paper/qwen2.5-14b-instruct.json /tmp/target-14b \
        --tokenizer ~/.cache/draftkv/models/qwen2.5-coder-1.5b-instruct --device cuda

Latency and memory of a fixed number of tokens (`draftkv bench` ignores end-of-text) depend on the
shapes, not on the weights' values, so a GPU machine that cannot receive the real weights can still
be measured. Accuracy can not: never evaluate on such a copy. `--override key=value` changes a config
value (a rehearsal on a CPU shrinks the model so).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def load_config(source: Path, overrides: list[str]):
    values = {}
    for item in overrides:
        key, _, value = item.partition("=")
        values[key] = json.loads(value)
    if source.is_dir():
        return AutoConfig.from_pretrained(source, **values)
    config = json.loads(source.read_text(encoding="utf-8"))
    return AutoConfig.for_model(**{**config, **values})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a model folder (config.json and tokenizer files) or a config JSON file")
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="folder with the tokenizer files (default: the source folder)")
    parser.add_argument("--override", action="append", default=[], help="key=value (JSON value) over the config")
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    config = load_config(args.source, args.override)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    tokenizer = args.tokenizer or args.source
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, args.out / name)
    print(f"{args.out}: random {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters, {args.dtype}")


if __name__ == "__main__":
    main()
