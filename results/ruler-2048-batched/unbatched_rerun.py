"""The rows where the batched run differs from results/ruler-2048, run again with today's code and each
setting decoded on its own (--no-batch-settings): tells a difference of batching from one of the code
since (selection now breaks score ties by position, which moves SnapKV's family).

    python results/ruler-2048-batched/unbatched_rerun.py      # writes results/ruler-2048-batched/unbatched/
"""

from __future__ import annotations

import json
from pathlib import Path

from draftkv.eval import ruler, runner
from draftkv.models import load_pair

HERE = Path(__file__).parent


def main() -> None:
    batched = {json.loads(line)["key"]: json.loads(line) for line in (HERE / "results.jsonl").read_text().splitlines()}
    before = {json.loads(line)["key"]: json.loads(line)
              for line in Path("results/ruler-2048/results.jsonl").read_text().splitlines()}
    differing = [key for key in batched if key in before and batched[key]["prediction"] != before[key]["prediction"]]
    samples = sorted({key.split("|")[0] for key in differing})
    labels = {key.split("|")[1] for key in differing}
    pair = load_pair()
    chosen = []
    for sample_id in samples:
        task, length, seed, index = sample_id.rsplit("-", 3)
        chosen.append(ruler.generate(task, int(length), pair.tokenizer, samples=int(index) + 1, seed=int(seed))[-1])
    settings = [s for s in runner.settings(["snapkv", "pyramidkv", "ada-snapkv", "laq", "speckv-pc"], [128], [512])
                if s.label in labels]
    runner.run(pair, chosen, settings, HERE / "unbatched", {"samples": samples, "settings": [s.label for s in settings]},
               batch_settings=False)


if __name__ == "__main__":
    main()
