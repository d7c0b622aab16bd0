"""The cuDNN check of results/bench-gpu/README.md: the same requests with cuDNN attention on, off,
then on again, in one process (output: sdpa_check.txt). Needs the random-weight pair in /tmp/rand.

    python results/bench-gpu/sdpa_check.py
"""
import torch

import draftkv
from draftkv.synthetic import LAUNCH_QUESTION, notes_context

pair = draftkv.load_pair("/tmp/rand/target", "/tmp/rand/draft", device="cuda")
ctx = {n: notes_context(n, pair.tokenizer, seed=n) for n in (8000, 16000)}
def req(n, row=0):
    return draftkv.Request(context=notes_context(n, pair.tokenizer, seed=n + row) if row else ctx[n], question=LAUNCH_QUESTION, max_new_tokens=32, ignore_eos=True)
def one(label, method, n, batch=1, **kw):
    rs = draftkv.generate_batch(pair, [req(n, r) for r in range(batch)], method, **kw)
    s = rs[0].stats
    print(f"{label:10s} {method:8s} n={n} b={batch} ttft={s.time_to_first_token:.3f} decode_ms={1000*s.timings['decode']/max(s.new_tokens-1,1):.1f} prefill={s.timings.get('target_prefill',0):.3f} lookahead={s.timings.get('draft_lookahead',0):.3f} scoring={s.timings.get('scoring',0):.3f}", flush=True)
for label in ("default", "no-cudnn", "default"):
    torch.backends.cuda.enable_cudnn_sdp(label == "default")
    for n in (8000, 16000):
        for _ in range(2):
            one(label, "dense", n)
        one(label, "snapkv", n, budget=256)
        one(label, "speckv", n, budget=256)
    one(label, "dense", 16000, batch=8)
