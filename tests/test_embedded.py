"""Integration on the real embedded pair (Qwen2.5-Coder 1.5B target, 0.5B draft): minutes on a CPU."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import draftkv

pytestmark = pytest.mark.embedded

NOTES = (Path(__file__).parent.parent / "examples" / "notes.txt").read_text(encoding="utf-8")
QUESTION = "When is the launch? Answer with the date and time."


def mentions_launch_date(text: str) -> bool:
    return bool(re.search(r"14(th)?\s+(of\s+)?October|October\s+14", text, re.IGNORECASE))


@pytest.fixture(scope="module")
def pair():
    return draftkv.load_pair()


def test_hidden_fact_is_answered_by_dense_and_by_speckv_at_256(pair):
    dense = draftkv.generate(pair, NOTES, QUESTION, method="dense", max_new_tokens=40)
    assert 1800 <= dense.stats.prompt_tokens <= 2600  # about 2k tokens, the fact in the middle
    assert mentions_launch_date(dense.text), dense.text

    speckv = draftkv.generate(pair, NOTES, QUESTION, method="speckv", budget=256, max_new_tokens=40)
    assert speckv.stats.compressed and speckv.stats.kv_entries == 256
    assert speckv.stats.kv_bytes * speckv.stats.prompt_tokens == speckv.stats.kv_bytes_dense * 256
    assert speckv.stats.lookahead_tokens > 0
    assert mentions_launch_date(speckv.text), speckv.text


def test_hidden_fact_survives_specpc_at_512(pair):
    compressed = draftkv.compress_prompt(pair, NOTES, QUESTION, method="specpc", budget=512)
    assert compressed.kept_tokens == 512
    assert mentions_launch_date(compressed.text), "SpecPC dropped the sentence with the launch date"
    result = draftkv.generate(pair, NOTES, QUESTION, method="specpc", budget=512, max_new_tokens=40)
    assert result.stats.kept_prompt_tokens == 512 and result.stats.compressed
    assert result.stats.kv_bytes * result.stats.prompt_tokens == result.stats.kv_bytes_dense * 512
    assert mentions_launch_date(result.text), result.text
