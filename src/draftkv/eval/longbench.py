"""LongBench (Bai et al., 2023) from local files: the standard JSONL layout, per-task generation
lengths and metrics. Real text cannot be generated, so the data folder is the user's.

Each task file is `DATA_DIR/<task>.jsonl` with `input`, `context`, `answers`, `all_classes`, `length`
and `_id` per line. Contexts longer than `max_length` tokens are cut in the middle (the first and
last halves kept), as LongBench does.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError
from ..prompt import encode_prompt
from .ruler import Sample

# task -> (new tokens to generate, metric, kind of instruction); the English tasks of LongBench
TASKS: dict[str, tuple[int, str, str]] = {
    "narrativeqa": (128, "qa_f1", "qa"), "qasper": (128, "qa_f1", "qa"), "multifieldqa_en": (64, "qa_f1", "qa"),
    "hotpotqa": (32, "qa_f1", "qa"), "2wikimqa": (32, "qa_f1", "qa"), "musique": (32, "qa_f1", "qa"),
    "gov_report": (512, "rouge_l", "summary"), "qmsum": (512, "rouge_l", "query_summary"),
    "multi_news": (512, "rouge_l", "summary"), "trec": (64, "classification", "fewshot"),
    "triviaqa": (32, "qa_f1", "fewshot"), "samsum": (128, "rouge_l", "fewshot"),
    "passage_count": (32, "count_score", "count"), "passage_retrieval_en": (32, "retrieval_score", "retrieval"),
    "lcc": (64, "code_similarity", "code"), "repobench-p": (64, "code_similarity", "code"),
}
INSTRUCTIONS = {
    "qa": ("Read the text below and answer the question after it as briefly as you can.",
           "Question: {input}\nGive only the answer."),
    "summary": ("Summarise the text below.", "Write the summary."),
    "query_summary": ("Read the transcript below; a request about it follows.", "Request: {input}"),
    "fewshot": ("Follow the pattern of the examples below.", "{input}"),
    "count": ("Below are several paragraphs; some of them repeat others.",
              "How many different paragraphs are there? Give only the number."),
    "retrieval": ("Below are several numbered paragraphs.",
                  "Which paragraph is this summary of? Answer like 'Paragraph 3'.\nSummary: {input}"),
    "code": ("Complete the code below.", "{input}Give the next line of code."),
}


def read_task(data_dir: Path, task: str) -> list[dict]:
    if task not in TASKS:
        raise ConfigError(f"unknown LongBench task {task!r}; tasks: {', '.join(TASKS)}")
    path = Path(data_dir) / f"{task}.jsonl"
    if not path.exists():
        raise ConfigError(f"{path} does not exist: LongBench is read from local files (DATA_DIR/<task>.jsonl)")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            _ = item["input"], item["context"], item["answers"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConfigError(f"{path}, line {number}: not a LongBench item ({error}); each line needs input, "
                              "context and answers") from None
        items.append(item)
    return items


def middle_truncated(tokenizer, text: str, keep: int) -> str:
    """The text cut to `keep` tokens by dropping its middle."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= keep:
        return text
    head = keep // 2
    return tokenizer.decode(ids[:head]) + tokenizer.decode(ids[len(ids) - (keep - head):])


def samples(data_dir: Path, task: str, tokenizer, *, limit: int | None = None, max_length: int = 8192,
            chat_template: bool = True) -> list[Sample]:
    """The task's items as samples whose prompts fit `max_length` tokens of the target's tokenizer."""
    max_new_tokens, metric, kind = TASKS[task]
    intro, ask = INSTRUCTIONS[kind]
    result = []
    for index, item in enumerate(read_task(data_dir, task)[:limit]):
        question = ask.format(input=item["input"])
        sample = Sample(str(item.get("_id", f"{task}-{index}")), task, max_length, 0, "", question, "",
                        [str(a) for a in item["answers"]], metric, max_new_tokens, 0, 0,
                        [str(c) for c in item.get("all_classes") or []])
        room = max_length - len(encode_prompt(tokenizer, sample.request(chat_template)).ids)
        while True:  # re-tokenised in place, the cut text may take a few tokens more: shrink until it fits
            if room < 16:
                raise ConfigError(f"max_length {max_length} leaves no room for the {task} context; give a larger one")
            sample.context = f"{intro}\n\n{middle_truncated(tokenizer, item['context'], room)}"
            sample.prompt_tokens = len(encode_prompt(tokenizer, sample.request(chat_template)).ids)
            if sample.prompt_tokens <= max_length:
                break
            room -= sample.prompt_tokens - max_length
        result.append(sample)
    return result
