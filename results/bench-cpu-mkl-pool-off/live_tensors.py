"""List every tensor alive just before the target's prefill (weights excluded), for dense and SpecKV
at 1k tokens: what SpecKV's target stage could hold beyond dense's.

Run from the repository root: .venv/bin/python results/bench-cpu-mkl-pool-off/live_tensors.py
"""

from __future__ import annotations

import contextlib
import gc
import warnings

import torch

from draftkv import bench
from draftkv.flow import StageEvent, run
from draftkv.methods import get_method
from draftkv.models import load_pair

warnings.filterwarnings("ignore", category=FutureWarning)  # gc.get_objects() meets deprecated torch names
pair = load_pair("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct", device="cpu", dtype="float32")
weights = {id(t) for m in (pair.target.model, pair.draft.model) for t in [*m.parameters(), *m.buffers()]}
requests = bench.bench_requests(pair.tokenizer, 1024, 1, 32)


def list_live_tensors(event: StageEvent) -> None:
    if (event.stage, event.event) != ("target_prefill", "start"):
        return
    gc.collect()
    storages = {}
    for thing in gc.get_objects():
        with contextlib.suppress(Exception):  # some objects refuse isinstance checks or storage access
            if isinstance(thing, torch.Tensor) and id(thing) not in weights:
                storage = thing.untyped_storage()
                storages[storage.data_ptr()] = (storage.nbytes(), tuple(thing.shape), thing.dtype)
    total = sum(size for size, _, _ in storages.values())
    print(f"  before the target prefill: {total / 2**20:.2f} MiB in {len(storages)} tensors")
    for size, shape, dtype in sorted(storages.values(), key=lambda entry: -entry[0])[:10]:
        print(f"    {size / 2**20:.3f} MiB {shape} {dtype}")


for name, params in (("dense", {}), ("speckv", {"budget": 256})):
    print(name)
    run(pair, requests, [get_method(name, **params)], observer=list_live_tensors)
