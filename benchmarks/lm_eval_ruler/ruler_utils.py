"""Score an lm-eval generation of a dumped RULER sample with the sample's own metric, as `draftkv eval` does."""

from draftkv.eval.metrics import ruler_all, ruler_part

METRICS = {"all": ruler_all, "part": ruler_part}


def process_results(doc: dict, results: list[str]) -> dict:
    return {"score": METRICS[doc["metric"]](results[0], doc["answers"])}
