#!/usr/bin/env bash
# draftkv's KVzip against kvpress 0.5.5's KVzipPress (issue 47): the same target, dtype and token ids.
# kvpress pins its own transformers, so it runs in an environment of its own ($KVPRESS_ENV).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=results/kvzip-reference
env=${KVPRESS_ENV:-/tmp/kvpress-env}
if [ ! -x "$env/bin/python" ]; then
  python3 -m venv "$env"
  "$env/bin/pip" install -q torch==2.13.0 kvpress==0.5.5
fi
python benchmarks/kvzip_reference.py prompts --out "$out"
target=$(python -c "import json; print(json.load(open('$out/prompts.json'))['target'])")
"$env/bin/python" benchmarks/kvzip_kvpress.py --model "$target" --dir "$out" --dtype bfloat16
python benchmarks/kvzip_reference.py compare --dir "$out"
