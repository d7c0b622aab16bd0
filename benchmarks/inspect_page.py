"""How large the inspector's page is and how long a browser takes to draw it, at 2k to 32k prompt tokens.

The page's data here is synthetic (random words, importance and kept shares for four methods, two of them
KV methods): its size and drawing time depend on the number of tokens and methods, not on the model.

    python benchmarks/inspect_page.py --out results/inspect-page [--browser chromium]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

from draftkv.inspection import Inspection, MethodView

WORDS = ["the", "launch", "review", "audit", "billing", "owner", "week", "notes", "magic", "number", "of", "a", "to", "and", "is"]


def synthetic(tokens: int, seed: int = 0) -> Inspection:
    rng = random.Random(seed)
    texts = [rng.choice(WORDS) + " " for _ in range(tokens)]
    views = []
    for name, kv in (("dense", False), ("snapkv (budget=256)", True), ("speckv (budget=256)", True),
                     ("specpc (budget=1024)", False)):
        importance = None if name == "dense" else [round(rng.random() ** 4, 4) for _ in range(tokens)]
        if name == "dense":
            share = [1.0] * tokens
        elif kv:
            share = [round(min(1.0, rng.random() ** 6 * 3), 4) for _ in range(tokens)]
        else:
            share = [float(rng.random() < 1024 / tokens) for _ in range(tokens)]
        stats = {"kv_bytes": 1, "kv_bytes_dense": 2, "time_to_first_token": 1.0, "timings": {"decode": 1.0},
                 "note": "", "kv_entries": 256}
        views.append(MethodView(name, importance, share, sum(share), "KV entries" if kv else "prompt tokens",
                                "The launch is on Tuesday.", "The launch is on Tuesday." if kv else None, "", stats))
    return Inspection(texts, tokens - 20, "When is the launch?", views)


def draw_ms(browser: str, page: Path, profile: Path) -> float:
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                          f"--user-data-dir={profile}", "--window-size=1600,1000", "--virtual-time-budget=20000",
                          "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True, timeout=300).stdout
    return float(re.search(r'data-rendered-ms="(\d+)"', dom).group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/inspect-page"))
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--lengths", default="2048,8192,32768")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    version = subprocess.run([args.browser, "--version"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for tokens in (int(t) for t in args.lengths.split(",")):
            page = synthetic(tokens).write(Path(scratch) / f"page-{tokens}.html")
            times = [draw_ms(args.browser, page, Path(scratch) / "profile") for _ in range(args.repeats)]
            rows.append({"tokens": tokens, "methods": 4, "bytes": page.stat().st_size,
                         "drawn_ms_median": statistics.median(times), "drawn_ms": times})
            print(f"{tokens} tokens: {page.stat().st_size / 2**20:.2f} MiB, drawn in {statistics.median(times):.0f} ms "
                  f"(median of {args.repeats}: {times})")
    (args.out / "page.json").write_text(json.dumps({"browser": version, "rows": rows}, indent=1) + "\n",
                                        encoding="utf-8")


if __name__ == "__main__":
    main()
