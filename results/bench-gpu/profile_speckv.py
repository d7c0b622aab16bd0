"""Stage times and a torch profile of one SpecKV request at 8k on the random-weight pair in /tmp/rand
(output: profile_speckv.txt, the tables cut to their first rows).

    python results/bench-gpu/profile_speckv.py /tmp/trace.json
"""
import sys

from torch.profiler import ProfilerActivity, profile

import draftkv
from draftkv.synthetic import LAUNCH_QUESTION, notes_context

pair = draftkv.load_pair("/tmp/rand/target", "/tmp/rand/draft", device="cuda")
ctx = notes_context(8000, pair.tokenizer)
kw = dict(context=ctx, question=LAUNCH_QUESTION, max_new_tokens=4)
for method in ("dense", "speckv", "speckv"):
    r = draftkv.generate(pair, method=method, budget=256, **kw) if method != "dense" else draftkv.generate(pair, **kw)
    print(method, {k: round(v, 3) for k, v in r.stats.timings.items()}, round(r.stats.time_to_first_token, 3))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    r = draftkv.generate(pair, method="speckv", budget=256, **kw)
print({k: round(v, 3) for k, v in r.stats.timings.items()})
t = prof.key_averages()
print(t.table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=60))
print(t.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
prof.export_chrome_trace(sys.argv[1])
