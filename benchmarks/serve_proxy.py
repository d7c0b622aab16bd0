"""Time to first token through the compressing proxy against sending the full prompt to the upstream.

    draftkv serve --port 8001 --draft none                       # the upstream (any OpenAI engine)
    draftkv serve --port 8000 --upstream http://127.0.0.1:8001/v1 --upstream-model MODEL --prompt-budget 1024
    python benchmarks/serve_proxy.py --proxy http://127.0.0.1:8000/v1 --upstream http://127.0.0.1:8001/v1 \
        --model MODEL --length 4096 --out results/serve

The same long prompt (the notes with one launch fact) goes, streaming, to the upstream directly and
through the proxy, interleaved; each row has the prompt tokens before and after, the time to first
token, the total time and whether the answer names the launch date.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import openai
from transformers import AutoTokenizer

from draftkv.models.embedded import converted_dir
from draftkv.synthetic import LAUNCH_QUESTION, notes_context


def timed(client: openai.OpenAI, model: str, content: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    first, parts, usage, proxy = None, [], None, {}
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                max_tokens=max_tokens, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
            proxy = (chunk.model_extra or {}).get("draftkv") or {}  # the proxy's own part, beside the usage
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - started
            parts.append(chunk.choices[0].delta.content)
    text = "".join(parts)
    return {"ttft_s": first, "total_s": time.perf_counter() - started, "answer": text,
            "correct": bool(re.search(r"14(th)?\s+(of\s+)?October|October\s+14", text, re.IGNORECASE)),
            "prompt_tokens": usage.prompt_tokens, "kept_prompt_tokens": usage.model_extra.get("kept_prompt_tokens"),
            "proxy_timings": proxy.get("timings")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--proxy", required=True)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokenizer", default=str(converted_dir("qwen2.5-coder-1.5b-instruct")),
                        help="a tokenizer folder, to size the prompt (default: the embedded target's)")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens (about)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--file", default="proxy.json", help="the result file's name in --out")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    content = notes_context(args.length - 40, tokenizer, seed=args.length) + "\n\n" + LAUNCH_QUESTION
    clients = {"direct": openai.OpenAI(base_url=args.upstream, api_key="unused", max_retries=0, timeout=3600),
               "proxy": openai.OpenAI(base_url=args.proxy, api_key="unused", max_retries=0, timeout=3600)}
    rows = []
    for repeat in range(args.repeats):
        for route, client in clients.items():
            rows.append({"route": route, "repeat": repeat, **timed(client, args.model, content, args.max_tokens)})
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / args.file).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
