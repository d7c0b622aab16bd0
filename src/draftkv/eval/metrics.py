"""Scoring functions: RULER's substring matches and LongBench's standard metrics (x100)."""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import cache


def ruler_all(prediction: str, references: list[str]) -> float:
    """Mean over references of (reference in prediction), case-insensitive."""
    text = prediction.lower()
    return 100.0 * sum(ref.lower() in text for ref in references) / len(references)


def ruler_part(prediction: str, references: list[str]) -> float:
    """100 if any reference is in the prediction, case-insensitive."""
    text = prediction.lower()
    return 100.0 * any(ref.lower() in text for ref in references)


def normalize(text: str) -> str:
    """Lowercase, drop punctuation and English articles, squeeze spaces (the SQuAD normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def qa_f1(prediction: str, references: list[str]) -> float:
    """Best token-level F1 against any reference, after normalisation."""
    def f1(reference: str) -> float:
        predicted, gold = normalize(prediction).split(), normalize(reference).split()
        common = sum((Counter(predicted) & Counter(gold)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(predicted), common / len(gold)
        return 2 * precision * recall / (precision + recall)

    return 100.0 * max(f1(ref) for ref in references)


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, references: list[str]) -> float:
    """Best ROUGE-L F-measure against any reference (rouge-score)."""
    return 100.0 * max(_rouge().score(ref, prediction)["rougeL"].fmeasure for ref in references)


def classification(prediction: str, references: list[str], classes: list[str]) -> float:
    """1 / (classes named in the prediction) when the right class is among them, else 0."""
    named = [c for c in classes if c in prediction]
    named = [c for c in named if not any(c != other and c in other for other in named)]  # prefer the longest match
    return 100.0 * (1.0 / len(named) if any(ref in named for ref in references) else 0.0)


def code_similarity(prediction: str, references: list[str]) -> float:
    """Edit similarity (rapidfuzz) of the first line that is code, against the reference."""
    from rapidfuzz import fuzz

    lines = [line for line in prediction.lstrip("\n").split("\n") if line.strip() and not line.strip().startswith(
        ("`", "#", "//"))]
    first = lines[0] if lines else ""
    return max(fuzz.ratio(first, ref) for ref in references)


def count_score(prediction: str, references: list[str]) -> float:
    """Share of the numbers in the prediction equal to the reference count."""
    numbers = re.findall(r"\d+", prediction)
    return 100.0 * (sum(n == str(references[0]) for n in numbers) / len(numbers) if numbers else 0.0)


def retrieval_score(prediction: str, references: list[str]) -> float:
    """Share of the paragraph numbers in the prediction equal to the reference's ('Paragraph N')."""
    wanted = re.findall(r"Paragraph (\d+)", references[0])
    numbers = re.findall(r"\d+", prediction)
    return 100.0 * (sum(n == wanted[0] for n in numbers) / len(numbers) if numbers and wanted else 0.0)


# Each metric that needs only the references, by the name a sample's `metric` carries (classification also
# needs the classes, so the runner calls it itself).
SCORERS = {"all": ruler_all, "part": ruler_part, "qa_f1": qa_f1, "rouge_l": rouge_l,
           "code_similarity": code_similarity, "count_score": count_score, "retrieval_score": retrieval_score}
