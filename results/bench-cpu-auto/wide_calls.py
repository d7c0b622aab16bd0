"""A target call reading 1, 2, 3, 5 and 9 tokens over caches of 128, 2,048 and 8,192 entries, with
transformers' own SDPA path (each KV head copied once per query head it serves, for a masked call of
several tokens) and with the query heads stacked (`few_queries`, what speculation uses). The cache holds
random entries: what a call costs does not depend on them. Best of three after a warm-up, ms.

    python results/bench-cpu-auto/wide_calls.py > results/bench-cpu-auto/wide_calls.json
"""

import json
import time
from contextlib import nullcontext

import torch

from draftkv import load_pair
from draftkv.engine.attention import few_queries
from draftkv.engine.cache import new_cache
from draftkv.engine.speculation import EagerReader

WIDTHS = (1, 2, 3, 5, 9)


def random_cache(model: torch.nn.Module, entries: int):
    config = model.config.get_text_config()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cache = new_cache(model.config)
    for layer in range(config.num_hidden_layers):
        keys = torch.randn(1, config.num_key_value_heads, entries, head_dim)
        cache.update(keys, torch.randn_like(keys), layer)
    return cache


def timings(model: torch.nn.Module, entries: int, stacked: bool) -> dict[int, float]:
    reader = EagerReader(model, random_cache(model, entries), None, max(WIDTHS))
    seconds = {}
    with few_queries(model) if stacked else nullcontext():
        for width in (WIDTHS[0], *WIDTHS):
            runs = []
            for _ in range(3):
                started = time.perf_counter()
                reader.read([[5] * width], [entries], 1)
                runs.append(time.perf_counter() - started)
                reader.take_back([width])
            seconds[width] = round(1e3 * min(runs), 1)
    return seconds


def main() -> None:
    torch.manual_seed(0)
    pair = load_pair()
    rows = []
    for entries in (128, 2048, 8192):
        for name, model in (("target", pair.target.model), ("draft", pair.draft.model)):
            for stacked in (False, True):
                rows.append({"model": name, "cache_entries": entries, "stacked": stacked,
                             "ms_by_tokens_read": timings(model, entries, stacked)})
    print(json.dumps({"target": pair.target.name, "draft": pair.draft.name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
