"""How soon a request whose client left frees the server's only worker, on the embedded pair: a 4k-token KVzip
request with `chunk: 64` whose client gives up after 1 s, then a small request sent at once. Reports how long
the small one waited for the worker (its time to answer less its own run), as JSON lines in OUT.

    python benchmarks/serve_deadline.py --out results/serve-deadline/runs.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cancel", type=float, default=1.0, help="seconds after which the first client leaves")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length of the KVzip request")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import draftkv
    from draftkv.eval import ruler
    from draftkv.serving import ServeSettings, create_app

    pair = draftkv.load_pair()
    sample = ruler.generate("niah_single_2", args.tokens, pair.tokenizer, samples=1, seed=0)[0]
    long_request = {"model": "served", "messages": [{"role": "user", "content": sample.context + "\n" + sample.question}],
                    "max_tokens": 16, "method": "kvzip", "budget": 0.25, "chunk": 64}
    small_request = {"model": "served", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4}
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from live import Live  # the tests' loopback server: uvicorn in a thread

    server = Live(create_app(pair, ServeSettings(model_name="served")))
    scheduler = server.app.state.server.scheduler
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for repeat in range(args.repeats):
            sent = time.monotonic()
            try:
                first = httpx.post(server.url + "/chat/completions", json=long_request, timeout=args.cancel)
                status = first.status_code
            except httpx.TimeoutException:
                status = "left"  # the client gave up and closed its connection
            answered = time.monotonic()
            second = httpx.post(server.url + "/chat/completions", json=small_request, timeout=600)
            done = time.monotonic()
            while scheduler.running:  # (the small request has finished: the worker is idle)
                time.sleep(0.01)
            row = {"repeat": repeat, "prompt_tokens": len(pair.tokenizer(sample.context)["input_ids"]),
                   "cancel_s": args.cancel, "first": status,
                   "first_left_s": round(answered - sent, 3), "second_status": second.status_code,
                   "second_took_s": round(done - answered, 3)}
            if second.status_code == 200:  # its own run; the rest is the wait for the worker
                row["second_ran_s"] = round(second.json()["draftkv"]["total_time"], 3)
                row["second_waited_s"] = round(row["second_took_s"] - row["second_ran_s"], 3)
            print(json.dumps(row), flush=True)
            with args.out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
