#!/usr/bin/env bash
# The inspector on the embedded pair: a held-out RULER needle (niah_single_3 at 2k, seed 101: not a seed of
# the committed runs), read by dense, SnapKV, SpecKV and SpecPC; then a screenshot of the page in Chromium.
set -euo pipefail
here=results/inspect-embedded
draftkv eval ruler --length 2048 --samples 1 --tasks niah_single_3 --seed 101 --dump "$here/sample.jsonl"
python - "$here" <<'PY'
import json, sys
sample = json.loads(open(f"{sys.argv[1]}/sample.jsonl").readline())
open(f"{sys.argv[1]}/context.txt", "w").write(sample["context"])
json.dump({k: sample[k] for k in ("question", "answer_prefix", "answers")}, open(f"{sys.argv[1]}/question.json", "w"))
PY
question=$(python -c "import json; print(json.load(open('$here/question.json'))['question'])")
prefix=$(python -c "import json; print(json.load(open('$here/question.json'))['answer_prefix'])")
draftkv inspect --context-file "$here/context.txt" -q "$question" --answer-prefix "$prefix" \
  --methods snapkv@256,speckv@256,dense,specpc@512 --max-new-tokens 48 --out "$here/page.html" --json > "$here/page.json"
# the needle's first token, so the screenshot shows both panels there
python - "$here" <<'PY'
import json, sys
here = sys.argv[1]
tokens = json.load(open(f"{here}/page.json"))["tokens"]
answer = json.load(open(f"{here}/question.json"))["answers"][0]
starts, text = [], ""
for token in tokens:
    starts.append(len(text))
    text += token
at = text.index(answer)
open(f"{here}/needle_token.txt", "w").write(str(max(i for i, start in enumerate(starts) if start <= at)))
PY
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1600,1000 \
  --screenshot="$here/screenshot.png" "file://$PWD/$here/page.html#left=0&right=1&token=$(cat "$here/needle_token.txt")"
rm "$here/page.json"  # the same data is inside page.html
