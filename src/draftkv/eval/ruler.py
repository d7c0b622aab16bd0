"""RULER (Hsieh et al., 2024), generated here at any length with the target's own tokenizer.

Each sample's full prompt (chat template, context, question, answer prefix) has at most the
requested number of tokens and is within `tolerance(length)` of it: the haystack is grown by a binary
search over its size. Samples are seeded and reproducible. The 13 standard tasks are those of
EVALUATION.md; the QA tasks need local SQuAD / HotpotQA files and are skipped with a message without.
"""

from __future__ import annotations

import json
import random
import string
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..prompt import encode_prompt
from ..types import Request
from .haystacks import NOISE, essay_words, word_list

# task -> (new tokens to generate, metric)
TASKS: dict[str, tuple[int, str]] = {
    "niah_single_1": (128, "all"), "niah_single_2": (128, "all"), "niah_single_3": (128, "all"),
    "niah_multikey_1": (128, "all"), "niah_multikey_2": (128, "all"), "niah_multikey_3": (128, "all"),
    "niah_multivalue": (128, "all"), "niah_multiquery": (128, "all"),
    "vt": (30, "all"), "cwe": (120, "all"), "fwe": (50, "all"), "qa_1": (32, "part"), "qa_2": (32, "part"),
}
DOWNLOAD_FREE = [task for task in TASKS if not task.startswith("qa_")]


class TaskUnavailable(Exception):
    """A task whose data is not on this machine (the QA tasks without their files)."""


@dataclass
class Sample:
    id: str
    task: str
    length: int  # the requested prompt length in tokens
    prompt_tokens: int  # the real one, with the target's chat template
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    metric: str
    max_new_tokens: int
    seed: int  # the sample's own seed: builder(task)(seed, haystack_units) rebuilds it
    haystack_units: int  # haystack size: the largest that fits the length (one unit more would not)
    classes: list[str] = field(default_factory=list)  # the labels of a classification task (LongBench)

    def request(self, chat_template: bool = True) -> Request:
        return Request(context=self.context, question=self.question, answer_prefix=self.answer_prefix,
                       max_new_tokens=self.max_new_tokens, chat_template=chat_template)

    def to_dict(self) -> dict:
        return asdict(self)


def tolerance(length: int) -> int:
    """How far below the requested length a sample may fall (never above it) with the usual tokenizers;
    a haystack whose unit is itself longer (one UUID needle, with a tiny tokenizer) may fall one unit short."""
    return max(64, length // 33)


Built = tuple[str, str, str, list[str]]  # context, question, answer prefix, answers


def place(units: list[str], inserts: list[str], rng: random.Random) -> list[str]:
    """Insert the needles at depths spread evenly over the haystack (a seeded offset), in order."""
    offset = rng.random()
    result = list(units)
    for i, needle in reversed(list(enumerate(inserts))):
        result.insert(int(len(units) * (i + offset) / len(inserts)), needle)
    return result


def word_key(rng: random.Random) -> str:
    return f"{rng.choice(word_list('adjective'))}-{rng.choice(word_list('noun'))}"


def niah(haystack: str, key_kind: str, value_kind: str, keys: int = 1, values: int = 1, queries: int = 1,
         essays: str | None = None) -> Callable[[int, int], Built]:
    kind = "numbers" if value_kind == "number" else "uuids"

    def new_value(rng: random.Random) -> str:
        return str(rng.randint(10**6, 10**7 - 1)) if value_kind == "number" else str(uuid.UUID(int=rng.getrandbits(128)))

    def new_key(rng: random.Random) -> str:
        return word_key(rng) if key_kind == "word" else str(uuid.UUID(int=rng.getrandbits(128)))

    def needle(key: str, value: str) -> str:
        return f"One of the special magic {kind} for {key} is: {value}."

    def build(seed: int, size: int) -> Built:
        rng = random.Random(seed)
        chosen = []
        while len(chosen) < keys:
            key = new_key(rng)
            if key not in chosen:
                chosen.append(key)
        pairs = [(key, new_value(rng)) for key in chosen for _ in range(values)]
        if haystack == "noise":
            units = [NOISE] * size
        elif haystack == "essay":
            words = essay_words(essays)
            start = rng.randrange(max(len(words) - size, 1))
            units = list(words[start: start + size])
            while len(units) < size:  # longer than the essays: wrap around
                units += words[: size - len(units)]
        else:  # the haystack is all needles: distractor keys with their own values
            units = [needle(new_key(rng), new_value(rng)) for _ in range(size)]
        inserts = [needle(key, value) for key, value in pairs]
        rng.shuffle(inserts)
        context = (f"Some special magic {kind} are hidden in the text below. Remember them: you will be asked "
                   f"about them after the text.\n" + " ".join(place(units, inserts, rng)))
        asked = chosen[:queries]
        names = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + " and " + asked[-1]
        question = f"What is the special magic {kind} for {names} mentioned in the provided text?"
        prefix = f"The special magic {kind} for {names} mentioned in the provided text are"
        return context, question, prefix, [value for key, value in pairs if key in asked]

    return build


def variable_tracking(seed: int, size: int, hops: int = 4) -> Built:
    rng = random.Random(seed)
    names = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    context = ("Memorize the chain of variable assignments hidden in the text below.\n"
               + " ".join(place([NOISE] * size, chain, rng)))
    question = f"Which variables hold the value {value}? List all of them."
    return context, question, f"The variables that hold the value {value} are:", names


def common_words(seed: int, size: int, common: int = 10, common_times: int = 30, rare_times: int = 3) -> Built:
    rng = random.Random(seed)
    pool = sorted(set(word_list("noun")) | set(word_list("adjective")) | set(word_list("verb")))
    chosen = rng.sample(pool, common + size)
    words = chosen[:common] * common_times + chosen[common:] * rare_times
    rng.shuffle(words)
    context = ("Below is a numbered list of words; some of them appear more often than others.\n"
               + " ".join(f"{i + 1}. {word}" for i, word in enumerate(words)))
    question = f"What are the {common} most common words in the list above?"
    return context, question, f"The {common} most common words in the list are:", chosen[:common]


def frequent_words(seed: int, size: int, alpha: float = 2.0, vocabulary: int = 500, top: int = 3) -> Built:
    rng = random.Random(seed)
    coded = []
    while len(coded) < vocabulary:
        word = "".join(rng.choices(string.ascii_lowercase, k=5))
        if word not in coded:
            coded.append(word)
    weights = [1 / (rank + 1) ** alpha for rank in range(vocabulary)]
    while True:  # resample until the top words are strictly more frequent than the rest
        words = rng.choices(coded, weights=weights, k=max(size, top + 1))
        counts = Counter(words).most_common(top + 1)
        if len(counts) <= top or counts[top - 1][1] > counts[top][1]:
            break
    context = "Read the coded text below and notice which coded words come up most.\n" + " ".join(words)
    question = f"What are the {top} most frequent coded words in the coded text above?"
    return context, question, f"The {top} most frequent coded words are:", [word for word, _ in counts[:top]]


def read_qa(task: str, path: str | None) -> list[tuple[str, list[str], list[str]]]:
    """(question, answers, [golden document, ...]) from SQuAD (qa_1) or HotpotQA (qa_2) JSON."""
    if not path:
        flag = "--squad" if task == "qa_1" else "--hotpotqa"
        raise TaskUnavailable(f"{task} needs a local {'SQuAD' if task == 'qa_1' else 'HotpotQA'} file ({flag} PATH)")
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    items = []
    if task == "qa_1":
        for article in data["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    if not qa.get("is_impossible") and qa["answers"]:
                        items.append((qa["question"], sorted({a["text"] for a in qa["answers"]}),
                                      [paragraph["context"]]))
    else:
        for item in data:
            documents = [f"{title}\n{''.join(sentences)}" for title, sentences in item["context"]]
            items.append((item["question"], [item["answer"]], documents))
    if not items:
        raise TaskUnavailable(f"{path} holds no answerable questions for {task}")
    return items


def question_answering(items: list[tuple[str, list[str], list[str]]]) -> Callable[[int, int], Built]:
    all_documents = sorted({doc for _, _, docs in items for doc in docs})

    def build(seed: int, size: int) -> Built:
        rng = random.Random(seed)
        question, answers, golden = items[rng.randrange(len(items))]
        others = [doc for doc in rng.sample(all_documents, min(size, len(all_documents))) if doc not in golden]
        documents = golden + others[: max(size - len(golden), 0)]
        rng.shuffle(documents)
        context = "Answer the question using the documents below.\n\n" + "\n\n".join(
            f"Document {i + 1}:\n{doc}" for i, doc in enumerate(documents))
        return context, f"Question: {question}", "Answer:", answers

    return build


def builder(task: str, essays: str | None, squad: str | None, hotpotqa: str | None) -> Callable[[int, int], Built]:
    builders: dict[str, Callable[[], Callable[[int, int], Built]]] = {
        "niah_single_1": lambda: niah("noise", "word", "number"),
        "niah_single_2": lambda: niah("essay", "word", "number", essays=essays),
        "niah_single_3": lambda: niah("essay", "word", "uuid", essays=essays),
        "niah_multikey_1": lambda: niah("essay", "word", "number", keys=4, essays=essays),
        "niah_multikey_2": lambda: niah("needles", "word", "number"),
        "niah_multikey_3": lambda: niah("needles", "uuid", "uuid"),
        "niah_multivalue": lambda: niah("essay", "word", "number", values=4, essays=essays),
        "niah_multiquery": lambda: niah("essay", "word", "number", keys=4, queries=4, essays=essays),
        "vt": lambda: variable_tracking,
        "cwe": lambda: common_words,
        "fwe": lambda: frequent_words,
        "qa_1": lambda: question_answering(read_qa("qa_1", squad)),
        "qa_2": lambda: question_answering(read_qa("qa_2", hotpotqa)),
    }
    if task not in builders:
        raise KeyError(f"unknown RULER task {task!r}; tasks: {', '.join(TASKS)}")
    return builders[task]()


def generate(task: str, length: int, tokenizer, *, samples: int, seed: int = 0, essays: str | None = None,
             squad: str | None = None, hotpotqa: str | None = None, chat_template: bool = True) -> list[Sample]:
    """`samples` samples of `task` whose prompts take at most `length` tokens of `tokenizer`."""
    build = builder(task, essays, squad, hotpotqa)
    max_new_tokens, metric = TASKS[task]

    def tokens(sample_seed: int, size: int) -> int:
        context, question, prefix, _ = build(sample_seed, size)
        request = Request(context=context, question=question, answer_prefix=prefix, chat_template=chat_template)
        return len(encode_prompt(tokenizer, request).ids)

    result = []
    for index in range(samples):
        sample_seed = random.Random(f"{seed}/{task}/{length}/{index}").getrandbits(32)
        if (smallest := tokens(sample_seed, 1)) > length:
            raise ConfigError(f"{task} does not fit in {length} tokens with this tokenizer: its smallest sample takes "
                              f"{smallest}; ask for a longer length")
        low, high = 1, 2
        while tokens(sample_seed, high) <= length:  # grow until too long, then bisect
            if high > 4 * length:  # the haystack ran out of material (a few QA documents): take it all
                low = high
                break
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if tokens(sample_seed, middle) <= length else (low, middle)
        context, question, prefix, answers = build(sample_seed, low)
        result.append(Sample(f"{task}-{length}-{seed}-{index}", task, length, tokens(sample_seed, low), context,
                             question, prefix, answers, metric, max_new_tokens, sample_seed, low))
    return result
