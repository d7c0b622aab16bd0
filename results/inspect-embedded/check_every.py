"""Open every-method.html in headless Chromium once per method (that method in the left panel) and check
the rendered page: every prompt token shown, and the kept count (prompt methods) or the summed kept
share (KV methods) equal to the method's stats. Run from the repository root after run_every.sh."""

import json
import re
import subprocess
import tempfile
from pathlib import Path

page = Path("results/inspect-embedded/every-method.html").resolve()
data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page.read_text(), re.S)
                  .group(1).replace("<\\/", "</"))
n = len(data["tokens"])
with tempfile.TemporaryDirectory() as profile:
    for index, view in enumerate(data["views"]):
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                              "--dump-dom", f"{page.as_uri()}#left={index}&right=-1"],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        spans = re.findall(r'<span class="t ([kd])[^"]*"[^>]*data-share="([0-9.e-]+)"', dom)
        kept = [float(share) for mark, share in spans if mark == "k"]
        shown = sum(kept) if view["kept_unit"].startswith("KV") else len(kept)
        wanted = view["stats"]["kv_entries"] if view["kept_unit"].startswith("KV") else view["kept"]
        ok = len(spans) == n and abs(shown - wanted) <= 0.02 * wanted and view["answer"].strip()[:20] in dom
        print(f"{view['label']:32} tokens shown {len(spans)}/{n}, kept {shown:.1f} (stats {wanted}), "
              f"answer {view['answer'].strip()[:40]!r}: {'ok' if ok else 'MISMATCH'}")
