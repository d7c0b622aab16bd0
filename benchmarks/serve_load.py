"""Load test of `draftkv serve`: concurrent OpenAI clients, each sending a series of requests.

    python benchmarks/serve_load.py --tiny --clients 16 --requests 8 --out results/serve
    python benchmarks/serve_load.py --url http://127.0.0.1:8000/v1 --model qwen2.5-coder-1.5b-instruct

With --tiny the script serves the tests' tiny random model itself (in this process, on loopback), so the
numbers measure the server (queueing, batching, HTTP, streaming), not a model. Half the requests stream.
Reports latency and time-to-first-token percentiles and throughput, and checks that every request got a
complete answer (and, with --tiny, the same answer the library gives for that prompt alone).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def one_request(client: openai.OpenAI, model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    started = time.perf_counter()
    messages = [{"role": "user", "content": prompt}]
    first = None
    if stream:
        parts, tokens = [], 0
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - started
                parts.append(chunk.choices[0].delta.content)
        text = "".join(parts)
    else:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens)
        text, tokens = reply.choices[0].message.content, reply.usage.completion_tokens
    return {"prompt": prompt, "text": text, "tokens": tokens, "stream": stream,
            "latency": time.perf_counter() - started, "first_token": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server's base URL (.../v1)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--tiny", action="store_true", help="serve the tests' tiny random model here")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--words", type=int, default=60, help="prompt length in words")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8, help="with --tiny")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    live, expected = None, {}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny import long_context  # the tests' word generator: cheap, seeded prompts

    prompts = [f"{long_context(args.words, seed=c * 1000 + r)} what is number {r}?"
               for c in range(args.clients) for r in range(args.requests)]
    if args.tiny:
        from conftest import tiny_pair
        from test_serve import Live

        import draftkv
        from draftkv.serving import ServeSettings, create_app

        pair = tiny_pair("qwen2")
        live = Live(create_app(pair, ServeSettings(model_name=args.model, max_batch_size=args.max_batch_size)))
        url = live.url
        expected = {p: draftkv.generate(pair, messages=[{"role": "user", "content": p}],
                                        max_new_tokens=args.max_tokens).text for p in prompts}
    else:
        url = args.url
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=3600)

    def run_client(index: int) -> list[dict]:
        return [one_request(client, args.model, prompts[index * args.requests + r], args.max_tokens, bool(r % 2))
                for r in range(args.requests)]

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        rows = [row for rows in pool.map(run_client, range(args.clients)) for row in rows]
    wall = time.perf_counter() - started
    if live is not None:
        live.stop()

    latencies = [r["latency"] for r in rows]
    firsts = [r["first_token"] for r in rows if r["first_token"] is not None]
    tokens = sum(r["tokens"] for r in rows)
    summary = {
        "clients": args.clients, "requests": len(rows), "wall_s": wall, "requests_per_s": len(rows) / wall,
        "generated_tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_p50_s": statistics.median(latencies), "latency_p95_s": percentile(latencies, 0.95),
        "latency_max_s": max(latencies), "first_token_p50_s": statistics.median(firsts) if firsts else None,
        "first_token_p95_s": percentile(firsts, 0.95) if firsts else None,
        "complete": sum(bool(r["text"]) or r["tokens"] == 0 for r in rows),
        "correct": sum(r["text"] == expected[r["prompt"]] for r in rows) if expected else None,
        "url": url if not args.tiny else "tiny model in process", "max_tokens": args.max_tokens,
        "prompt_words": args.words,
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "load.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
