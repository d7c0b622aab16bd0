#!/usr/bin/env bash
# Time `draftkv --help`, `draftkv methods`, `draftkv models`, an argument error and a `serve` flag error, before the lazy imports
# (commit efa3ebe, checked out beside) and after (this tree), on a quiet machine: 7 runs each, the median.
set -euo pipefail
before=${BEFORE:-/tmp/draftkv-before}
[ -d "$before" ] || git worktree add "$before" efa3ebe >/dev/null
python=.venv/bin/python
for tree in "$before/src" src; do
  for args in "--help" "methods" "models" "generate --budget 0 -q x" "serve --method nosuch"; do
    times=()
    for _ in 1 2 3 4 5 6 7; do
      start=$(date +%s.%N)
      PYTHONPATH=$tree $python -m draftkv $args >/dev/null 2>&1 </dev/null || true
      times+=("$(echo "$(date +%s.%N) - $start" | bc)")
    done
    median=$(printf '%s\n' "${times[@]}" | sort -n | sed -n 4p)
    echo "$tree | draftkv $args | median $median s | ${times[*]}"
  done
done
