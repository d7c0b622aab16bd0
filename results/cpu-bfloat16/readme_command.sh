#!/usr/bin/env bash
# The README's first command, before (the last commit with float32 on a CPU, d00a183, and its float32
# model cache) and after (today's default, dtype auto), interleaved, 3 times each, alone on the machine.
# Each line of readme_command.jsonl: which, the stats line's total (model time), wall time, peak RSS.
# Needs: a worktree of d00a183 at $OLD and its float32 cache at $OLD_CACHE (see README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
OLD=${OLD:-/tmp/old} OLD_CACHE=${OLD_CACHE:-/tmp/f32cache}
out=results/cpu-bfloat16/readme_command.jsonl
command=(-c "from draftkv.cli import run; run()" generate --method speckv --budget 256
         --context-file examples/notes.txt --question "When is the launch?")
for repeat in 1 2 3; do
  for which in float32-before auto-after; do
    if [ "$which" = float32-before ]; then
      env PYTHONPATH="$OLD/src" DRAFTKV_CACHE_DIR="$OLD_CACHE" /usr/bin/time -v python "${command[@]}" \
        >/tmp/readme.out 2>/tmp/readme.err
    else
      /usr/bin/time -v python "${command[@]}" >/tmp/readme.out 2>/tmp/readme.err
    fi
    python - "$which" "$repeat" >>"$out" <<'PY'
import json, re, sys
err = open("/tmp/readme.err").read()
stats = next(line for line in err.splitlines() if line.startswith("[speckv]"))
print(json.dumps({"which": sys.argv[1], "repeat": int(sys.argv[2]), "answer": open("/tmp/readme.out").read().strip(),
                  "total_s": float(re.search(r"total ([\d.]+)s", stats).group(1)),
                  "target_prefill_s": float(re.search(r"target_prefill ([\d.]+)s", stats).group(1)),
                  "wall": re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", err).group(1),
                  "peak_rss_bytes": 1024 * int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1)),
                  "stats": stats}))
PY
    tail -1 "$out" | cut -c 1-200
  done
done
