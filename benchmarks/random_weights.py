"""A random-weight copy of a model folder (same config and tokenizer, no weights read), for timing.

    python benchmarks/random_weights.py ~/.cache/draftkv/models/qwen2.5-coder-1.5b-instruct /tmp/target --device cuda

Latency and memory of a fixed number of tokens (`draftkv bench` ignores end-of-text) depend on the
shapes, not on the weights' values, so a GPU machine that cannot receive the real weights can still
be measured. Accuracy can not: never evaluate on such a copy.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="folder with config.json and the tokenizer files")
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu", help="where to initialise (cuda is much faster)")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()

    config = AutoConfig.from_pretrained(args.source)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    for name in TOKENIZER_FILES:
        if (args.source / name).exists():
            shutil.copy(args.source / name, args.out / name)
    print(f"{args.out}: random {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B "
          f"parameters, {args.dtype}")


if __name__ == "__main__":
    main()
