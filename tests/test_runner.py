"""The evaluation runner (resume, crash safety), the report, and `draftkv eval` on tiny models."""

from __future__ import annotations

import json
import re

import pytest
from tiny import make_tokenizer
from typer.testing import CliRunner

from draftkv.cli import app
from draftkv.errors import ConfigError
from draftkv.eval import report, ruler, runner
from draftkv.jsonl import read_rows

SETTINGS = runner.settings(["dense", "snapkv", "keep-last", "speckv"], [48, 96], [128])


@pytest.fixture(scope="module")
def samples():
    return (ruler.generate("niah_single_1", 400, make_tokenizer(), samples=2, seed=1)
            + ruler.generate("vt", 400, make_tokenizer(), samples=1, seed=1))


def test_settings_give_each_method_its_budgets():
    labels = [s.label for s in SETTINGS]
    assert labels == ["dense", "snapkv kv=48", "snapkv kv=96", "keep-last prompt=128", "speckv kv=48", "speckv kv=96"]
    cascade = [s.label for s in runner.settings(["speckv-pc"], [48, 256], [128])]
    assert cascade == ["speckv-pc kv=48 prompt=128"]  # a KV budget above the prompt budget makes no sense
    assert runner.Setting("speckv-pc", 48, 128).params == {"budget": 48, "prompt_budget": 128}
    assert runner.Setting("specpc", None, 128).params == {"budget": 128}
    with pytest.raises(ConfigError, match="unknown method"):
        runner.settings(["nope"], [1], [1])


def test_a_method_named_with_its_budget_runs_at_that_budget_only():
    runs = runner.settings(["snapkv", "specpc", "speckv-pc@256/1024", "h2o@64", "lingua@512"], [128, 256], [512, 1024])
    assert [s.label for s in runs] == [
        "snapkv kv=128", "snapkv kv=256", "specpc prompt=512", "specpc prompt=1024",
        "speckv-pc kv=256 prompt=1024", "h2o kv=64", "lingua prompt=512"]
    assert runs[4].params == {"budget": 256, "prompt_budget": 1024}
    for bad, message in [("speckv-pc@256", "speckv-pc@KV/PROMPT"), ("snapkv@1/2", "snapkv@KV"),
                         ("specpc@x", "specpc@PROMPT"), ("h2o@0", "whole numbers >= 1"),
                         ("snapkv@1.5", "ratios in (0, 1]"), ("speckv-pc@0.5/0", "speckv-pc@0.5/0.5"), ("dense@128", "takes no budget"),
                         ("speckv-pc@1024/256", "above the prompt budget"), ("nope@1", "unknown method")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            runner.settings([bad], [128], [512])
    with pytest.raises(ConfigError, match="named twice: snapkv kv=128"):
        runner.settings(["snapkv", "snapkv@128"], [128], [512])
    ratios = runner.settings(["snapkv@0.25", "speckv-pc@0.5/0.5", "speckv-pc@256/0.25"], [128], [512])
    assert [s.label for s in ratios] == ["snapkv kv=0.25", "speckv-pc kv=0.5 prompt=0.5", "speckv-pc kv=256 prompt=0.25"]
    assert ratios[1].params == {"budget": 0.5, "prompt_budget": 0.5}


def test_a_method_named_with_its_parameters_is_its_own_setting():
    runs = runner.settings(["speckv:verify_lookahead=false", "speckv", "speckv-pc:verify_lookahead=false@48/128",
                            "speckv:lookahead=8:verify_lookahead=false@96"], [48], [128])
    assert [s.label for s in runs] == [
        "speckv(verify_lookahead=False) kv=48", "speckv kv=48",
        "speckv-pc(verify_lookahead=False) kv=48 prompt=128", "speckv(lookahead=8,verify_lookahead=False) kv=96"]
    assert [s.make().verify_lookahead for s in runs] == [False, True, False, False]
    assert runs[3].params == {"lookahead": 8, "verify_lookahead": False, "budget": 96}
    for bad, message in [("speckv:nope=1", "has no parameter 'nope'"), ("speckv:verify", "name:key=value"),
                         ("speckv:verify_lookahead=maybe", "true or false")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            runner.settings([bad], [48], [128])


def count_calls(monkeypatch) -> list:
    """Every setting run (one entry per setting, whether it ran alone or with the sample's others)."""
    calls = []
    real = runner.sample_results

    def counting(pair, sample, settings, *args, **kwargs):
        for setting, result in real(pair, sample, settings, *args, **kwargs):
            calls.append(setting)
            yield setting, result

    monkeypatch.setattr(runner, "sample_results", counting)
    return calls


def test_run_resumes_and_recomputes_nothing(qwen_pair, samples, tmp_path, monkeypatch, capsys):
    calls = count_calls(monkeypatch)
    path = runner.run(qwen_pair, samples, SETTINGS, tmp_path, {"test": True})
    progress = capsys.readouterr().err.splitlines()  # one line a sample, when all its settings are written
    assert [line.split(" | ")[0] for line in progress] == [
        f"{i}/{len(samples)} samples: {sample.id} ({len(SETTINGS)} settings)" for i, sample in enumerate(samples, 1)]
    rows = runner.read_rows(path)
    assert len(rows) == len(calls) == len(samples) * len(SETTINGS)
    assert {row["key"] for row in rows} == {runner.key(s.id, setting) for s in samples for setting in SETTINGS}
    assert all(0 <= row["score"] <= 100 and row["stats"]["method"] == row["method"] for row in rows)
    runner.run(qwen_pair, samples, SETTINGS, tmp_path, {"test": True})
    assert len(calls) == len(rows)  # the second run computed nothing
    assert json.loads((tmp_path / "config.json").read_text())["test"] is True


def test_an_interrupted_run_loses_only_the_one_in_flight(qwen_pair, samples, tmp_path, monkeypatch):
    full = runner.run(qwen_pair, samples, SETTINGS, tmp_path / "full", {})
    lines = full.read_text().splitlines()
    killed = tmp_path / "killed"
    killed.mkdir()
    # Killed while writing line 5: four finished lines and half of the fifth.
    (killed / "results.jsonl").write_text("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    calls = count_calls(monkeypatch)
    runner.run(qwen_pair, samples, SETTINGS, killed, {})
    assert len(calls) == len(lines) - 4  # only the unfinished ones ran again
    resumed = runner.read_rows(killed / "results.jsonl")
    assert [row["key"] for row in resumed] == [row["key"] for row in runner.read_rows(full)]  # none lost
    assert [json.dumps(row) for row in resumed[:4]] == lines[:4]  # finished lines untouched
    assert all(line.startswith("{") for line in (killed / "results.jsonl").read_text().splitlines())


def test_report_tables_and_plot(tmp_path):
    rows = [
        {"key": f"{i}", "task": task, "method": method, "budget": budget, "prompt_budget": None, "score": score}
        for i, (task, method, budget, score) in enumerate([
            ("vt", "dense", None, 100.0), ("vt", "snapkv", 48, 50.0), ("vt", "snapkv", 48, 0.0),
            ("cwe", "dense", None, 80.0), ("cwe", "snapkv", 48, 40.0), ("cwe", "snapkv", 96, 60.0)])
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary, csv_path, plot = report.report(tmp_path)
    text = summary.read_text()
    assert text.splitlines()[0] == "| setting | cwe | vt | average |"
    assert "| dense | 80.0 (n=1) | 100.0 (n=1) | 90.0 (n=2) |" in text
    assert "| snapkv (kv 48) | 40.0 (n=1) | 25.0 (n=2) | 30.0 (n=3) |" in text
    assert "| snapkv (kv 96) | 60.0 (n=1) | - | 60.0 (n=1) |" in text
    assert "snapkv,48,,vt,25.00,2" in csv_path.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="empty is not a results folder"):
        report.report(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="empty has no results.jsonl"):
        report.report(tmp_path / "empty")
    (tmp_path / "empty" / "results.jsonl").write_text("")
    with pytest.raises(ConfigError, match="no finished results"):
        report.report(tmp_path / "empty")


def test_the_report_keeps_settings_apart_that_differ_in_their_parameters(tmp_path):
    rows = [{"key": f"{i}", "task": "vt", "method": "speckv", "budget": 48, "prompt_budget": None, "score": score,
             **({"params": {"verify_lookahead": False}} if paper else {})}
            for i, (paper, score) in enumerate([(True, 20.0), (False, 80.0), (True, 40.0)])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.report(tmp_path)[0].read_text()
    assert "| speckv(verify_lookahead=False) (kv 48) | 30.0 (n=2) | 30.0 (n=2) |" in text
    assert "| speckv (kv 48) | 80.0 (n=1) | 80.0 (n=1) |" in text


def test_the_report_reads_ratio_budgets_and_plots_them_at_what_they_kept(tmp_path, monkeypatch):
    rows = [{"key": f"{i}", "task": "vt", "method": method, "budget": budget, "prompt_budget": None, "score": score,
             "stats": {"kv_entries": kept}}
            for i, (method, budget, score, kept) in enumerate([
                ("dense", None, 100.0, 4000), ("kvzip", 256, 20.0, 256), ("kvzip", 0.25, 60.0, 1000),
                ("kvzip", 0.25, 80.0, 1020), ("snapkv", 1.5, 0.0, 0), ("snapkv", 0, 0.0, 0)])]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    plotted = {}
    real = report.plot

    def spy(table, found, path, kept=None):
        plotted.update(kept or {})
        real(table, found, path, kept)

    monkeypatch.setattr(report, "plot", spy)
    warnings: list[str] = []
    text = report.write_report(tmp_path, report.load_results([tmp_path], warnings.append))[0].read_text()
    assert "| kvzip (kv 0.25) | 70.0 (n=2) | 70.0 (n=2) |" in text
    assert "| kvzip (kv 256) | 20.0 (n=1) | 20.0 (n=1) |" in text
    assert plotted == {("kvzip", 0.25, None): 1010.0}
    assert "skipped 2 line(s)" in warnings[0] and "neither a count" in warnings[0]


def test_report_scores_the_guesses_that_probed_the_cache(tmp_path):
    def row(key, task, method, guess, answers, score):
        return {"key": key, "sample": key, "task": task, "method": method, "budget": 128, "prompt_budget": None,
                "metric": "all", "answers": answers, "guess": guess, "score": score}

    rows = [row("a", "vt", "speckv", " X1 and X2.", ["x1", "x3"], 100.0),  # the guess names one of two: 50
            row("b", "vt", "speckv", " nothing", ["x1"], 0.0),
            row("c", "cwe", "speckv", " y", ["y"], 100.0),
            row("a", "vt", "snapkv", None, ["x1", "x3"], 0.0)]  # no guess: not in the table
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.report(tmp_path)[0].read_text()
    section = text.split("## The guesses that probed the cache")[1]
    assert "| speckv (kv 128) | 100.0 / 100.0 (n=1) | 25.0 / 50.0 (n=2) | 50.0 / 66.7 (n=3) |" in section
    assert "snapkv" not in section
    (tmp_path / "results.jsonl").write_text(json.dumps(rows[-1]) + "\n")
    assert "guesses" not in report.report(tmp_path)[0].read_text()


def test_eval_ruler_command(tmp_path):
    from conftest import tiny_pair

    pair = tiny_pair("qwen2")
    folders = {}
    for role, loaded in (("target", pair.target), ("draft", pair.draft)):
        loaded.model.save_pretrained(tmp_path / role)
        loaded.tokenizer.save_pretrained(tmp_path / role)
        folders[role] = str(tmp_path / role)
    cli = CliRunner()
    base = ["eval", "ruler", "--target", folders["target"], "--draft", folders["draft"], "--length", "400",
            "--samples", "1", "--tasks", "niah_single_1,vt,qa_1", "--methods", "dense,snapkv", "--budgets", "64",
            "--dtype", "float32", "--out", str(tmp_path / "out")]  # batched, unbatched and speculated: same tokens
    result = cli.invoke(app, base)
    assert result.exit_code == 0, result.output
    assert "skipping qa_1" in result.stderr and "| dense |" in result.stdout
    assert len(runner.read_rows(tmp_path / "out" / "results.jsonl")) == 4
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"
    assert (tmp_path / "out" / "accuracy.png").exists()
    two_lengths = [("400,440" if arg == "400" else arg) for arg in base[:-2]]
    dump = cli.invoke(app, [*two_lengths, "--dump", str(tmp_path / "samples.jsonl")])
    assert dump.exit_code == 0 and len((tmp_path / "samples.jsonl").read_text().splitlines()) == 4
    dump = cli.invoke(app, [*base[:-2], "--dump", str(tmp_path / "samples.jsonl")])  # replaces, never appends
    assert dump.exit_code == 0 and len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2
    (tmp_path / "a-file").write_text("")
    refused = cli.invoke(app, [*base[:-2], "--dump", str(tmp_path / "a-file" / "samples.jsonl")])
    assert refused.exit_code != 0 and "--dump" in refused.output and "Traceback" not in refused.output
    again = cli.invoke(app, ["eval", "report", str(tmp_path / "out")])
    assert again.exit_code == 0 and "| snapkv (kv 64) |" in again.stdout
    unbatched = cli.invoke(app, [*base[:-1], str(tmp_path / "unbatched"), "--no-batch-settings"])
    assert unbatched.exit_code == 0, unbatched.output
    assert json.loads((tmp_path / "unbatched" / "config.json").read_text())["batch_settings"] is False
    assert [r["prediction"] for r in runner.read_rows(tmp_path / "unbatched" / "results.jsonl")] == \
        [r["prediction"] for r in runner.read_rows(tmp_path / "out" / "results.jsonl")]
    bad = cli.invoke(app, [*base[:-2], "--tasks", "niah_single_9"])
    assert bad.exit_code == 2 and "unknown RULER task" in bad.stderr
    sped = cli.invoke(app, [*base[:-1], str(tmp_path / "sped"), "--speculate", "2", "--draft-cache", "window"])
    assert sped.exit_code == 0, sped.output
    assert json.loads((tmp_path / "sped" / "config.json").read_text())["speculate"] == 2
    rows = runner.read_rows(tmp_path / "sped" / "results.jsonl")
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in runner.read_rows(tmp_path / "out" / "results.jsonl")]
    assert all(r["stats"]["proposed_tokens"] > 0 for r in rows)


def test_shared_and_separate_runs_write_the_same_rows(qwen_pair, samples, tmp_path):
    settings = SETTINGS + runner.settings(["specprefill", "lingua", "speckv-pc@48/128", "speckv:verify_lookahead=false"],
                                          [48], [128])
    shared = runner.read_rows(runner.run(qwen_pair, samples, settings, tmp_path / "shared", {}, share=True))
    separate = runner.read_rows(runner.run(qwen_pair, samples, settings, tmp_path / "separate", {}, share=False))
    unbatched = runner.read_rows(runner.run(qwen_pair, samples, settings, tmp_path / "unbatched", {},
                                            batch_settings=False))
    for rows in (separate, unbatched):
        assert sorted((r["key"], r["prediction"], r["score"]) for r in shared) == \
            sorted((r["key"], r["prediction"], r["score"]) for r in rows)
    assert any("shared prefill" in r["stats"]["note"] for r in shared)
    assert any("decoded in one batch" in r["stats"]["note"] for r in shared)
    paper = [r for r in shared if r["key"].endswith("|speckv(verify_lookahead=False) kv=48")]
    assert len(paper) == len(samples) and all(r["params"] == {"verify_lookahead": False} for r in paper)
    assert all(r["stats"]["accepted_guess_tokens"] == 0 for r in paper)
    assert not any("decoded in one batch" in r["stats"]["note"] for r in separate + unbatched)
    flags = {name: json.loads((tmp_path / name / "config.json").read_text())["batch_settings"]
             for name in ("shared", "separate", "unbatched")}
    assert flags == {"shared": True, "separate": False, "unbatched": False}


def test_a_speculating_run_writes_the_same_predictions(qwen_pair, samples, tmp_path):
    import dataclasses

    settings = runner.settings(["dense", "speckv"], [48], [128])
    plain = runner.read_rows(runner.run(qwen_pair, samples[:2], settings, tmp_path / "plain", {}))
    fast = runner.read_rows(runner.run(dataclasses.replace(qwen_pair, speculate=2), samples[:2], settings,
                                       tmp_path / "fast", {}))
    assert sorted((r["key"], r["prediction"]) for r in fast) == sorted((r["key"], r["prediction"]) for r in plain)
    assert all(r["stats"]["proposed_tokens"] > 0 for r in fast)
    assert not any("decoded in one batch" in r["stats"]["note"] for r in fast)  # each speculates on its own


def test_eval_longbench_command(tmp_path):
    from conftest import tiny_pair

    pair = tiny_pair("qwen2")
    for role, loaded in (("target", pair.target), ("draft", pair.draft)):
        loaded.model.save_pretrained(tmp_path / role)
        loaded.tokenizer.save_pretrained(tmp_path / role)
    data = tmp_path / "data"
    data.mkdir()
    (data / "hotpotqa.jsonl").write_text(json.dumps({"input": "who?", "context": "oscar papa " * 80,
                                                     "answers": ["oscar"], "_id": "a"}) + "\n", encoding="utf-8")
    base = ["eval", "longbench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"),
            "--tasks", "hotpotqa", "--methods", "dense,snapkv", "--budgets", "64", "--max-length", "300",
            "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*base, "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert "| dense |" in result.stdout and "| snapkv (kv 64) |" in result.stdout
    missing = CliRunner().invoke(app, [*base, "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr


def test_query_agnostic_runs(qwen_pair, samples, tmp_path):
    from draftkv.context import compress_context

    runs = runner.settings(["dense", "snapkv", "speckv", "ada-speckv"], [48], [])
    rows = runner.read_rows(runner.run(qwen_pair, samples[:1], runs, tmp_path, {}, query_agnostic=True))
    assert len(rows) == 4 and all("query-agnostic" in row["stats"]["note"] for row in rows)
    assert all("shared prefill" in row["stats"]["note"] for row in rows)  # one target prefill for the four
    separate = runner.read_rows(runner.run(qwen_pair, samples[:1], runs, tmp_path / "separate", {}, share=False,
                                           query_agnostic=True))
    assert [r["prediction"] for r in separate] == [r["prediction"] for r in rows]
    assert not any("shared prefill" in row["stats"]["note"] for row in separate)
    sample = samples[0]
    expected = compress_context(qwen_pair, sample.context, method="snapkv", budget=48,
                                max_new_tokens=sample.max_new_tokens).ask(
        sample.question, answer_prefix=sample.answer_prefix, max_new_tokens=sample.max_new_tokens)
    assert rows[1]["prediction"] == expected.text
    assert json.loads((tmp_path / "config.json").read_text())["query_agnostic"] is True


def test_results_that_cannot_be_written_give_a_clean_error(qwen_pair, samples, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ConfigError, match="cannot write the results to .* the same command resumes"):
        runner.run(qwen_pair, samples[:1], SETTINGS[:1], blocked / "results", {})


def write_results(folder, length: int, settings: dict, task: str = "vt"):
    """A results folder at `length`: {(method, kv budget, prompt budget): [the score of each sample]}."""
    folder.mkdir()
    with open(folder / "results.jsonl", "w") as handle:
        for (method, budget, prompt_budget), values in settings.items():
            for sample, value in enumerate(values):
                handle.write(json.dumps({"key": f"{sample}|{method}|{budget}|{prompt_budget}",
                                         "sample": f"{task}-{length}-{sample}", "task": task, "length": length,
                                         "method": method, "budget": budget, "prompt_budget": prompt_budget,
                                         "score": value}) + "\n")
    return folder


def test_the_cross_length_report_averages_margins_and_verdicts(tmp_path):
    """`draftkv eval report A B`: per setting and length its average with n, its share of dense, the
    SpecKV - SnapKV margin at equal budget (paired over samples, with its standard error) and a verdict
    on its trend that calls a change only past its noise."""
    scores = {  # length -> (method, kv budget, prompt budget) -> the scores of four samples of one task
        2048: {("dense", None, None): [100, 80, 100, 80], ("snapkv", 128, None): [40, 20, 40, 20],
               ("speckv", 128, None): [50, 40, 50, 40], ("snapkv", 256, None): [50, 40, 50, 40],
               ("speckv", 256, None): [60, 60, 60, 60]},
        4096: {("dense", None, None): [100, 60, 100, 60], ("snapkv", 128, None): [20, 0, 20, 0, 0],
               ("speckv", 128, None): [80, 70, 80, 70], ("snapkv", 256, None): [40, 50, 40, 50],
               ("speckv", 256, None): [60, 60, 60, 60]},
    }  # at 4,096 a partial run: one more SnapKV sample that SpecKV has not reached
    folders = [write_results(tmp_path / f"ruler-{length}", length, settings) for length, settings in scores.items()]
    result = CliRunner().invoke(app, ["eval", "report", *map(str, folders), "--out", str(tmp_path / "by-length")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "by-length" / "report.md").read_text()
    assert "| speckv (kv 128) | 45.0 (n=4) | 75.0 (n=4) | 50% | 94% |" in text
    assert "| speckv - snapkv at KV 128 | +15.0 ±2.9 (n=4) | +65.0 ±2.9 (n=4) |" in text  # the fifth sample unpaired
    assert "of 128: +15.0 ±2.9 (n=4) at 2,048, +65.0 ±2.9 (n=4) at 4,096; the lead grows with length (+50.0" in text
    assert "of 256: +15.0 ±2.9 (n=4) at 2,048, +15.0 ±2.9 (n=4) at 4,096; the lead holds (+0.0, within" in text
    for plot in ("accuracy_by_length.png", "margins_by_length.png"):
        assert (tmp_path / "by-length" / plot).read_bytes()[:4] == b"\x89PNG"
    assert "2048,vt,speckv,128,,45.00,4" in (tmp_path / "by-length" / "report.csv").read_text()
    assert not (tmp_path / "by-length" / "agreement_by_length.png").exists()  # no agreement folders given


def test_the_cross_length_report_holds_the_papers_methods_against_dense_and_adds_the_agreement(tmp_path):
    """The paper's methods minus dense at each length with a verdict on the trend, and, from `analyze
    agreement` folders, each importance estimate's agreement with the oracle against length."""
    scores = {
        2048: {("dense", None, None): [100, 80, 100, 80], ("speckv", 256, None): [60, 60, 60, 60],
               ("specpc", None, 1024): [100, 80, 100, 80], ("snapkv", 256, None): [0, 0, 0, 0]},
        4096: {("dense", None, None): [100, 60, 100, 60], ("speckv", 256, None): [90, 60, 90, 60],
               ("specpc", None, 1024): [60, 20, 60, 20], ("snapkv", 256, None): [0, 0, 0, 0]},
    }
    folders = [write_results(tmp_path / f"ruler-{length}", length, settings) for length, settings in scores.items()]
    recalls = {  # length -> sample -> (SpecKV's, SnapKV's recall) in each of two layers
        2048: {"a": ((1.0, 0.8), (0.9, 0.8)), "b": ((0.9, 0.8), (0.9, 0.7))},
        4096: {"a": ((1.0, 0.5), (0.9, 0.5)), "b": ((0.9, 0.4), (0.9, 0.4))},
    }
    agreement = []
    for length, samples in recalls.items():
        folder = tmp_path / f"agreement-{length}"
        folder.mkdir()
        with open(folder / "rows.jsonl", "w") as handle:
            for sample, layers in samples.items():
                for layer, (spec, snap) in enumerate(layers):
                    handle.write(json.dumps({"sample": f"vt-{length}-{sample}", "task": "vt", "length": length,
                                             "layer": layer, "speckv_spearman": 0.99, "snapkv_spearman": 0.9,
                                             "speckv_recall": spec, "snapkv_recall": snap}) + "\n")
        agreement += ["--agreement", str(folder)]
    out = tmp_path / "by-length"
    result = CliRunner().invoke(app, ["eval", "report", *map(str, folders), *agreement, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = (out / "report.md").read_text()
    assert "| speckv (kv 256) | -30.0 ±5.8 (n=4) | -5.0 ±2.9 (n=4) |" in text
    assert "- speckv (kv 256) against dense: -30.0 ±5.8 (n=4) at 2,048, -5.0 ±2.9 (n=4) at 4,096; level with dense" \
        in text
    assert "- specpc (prompt 1024) against dense: +0.0 ±0.0 (n=4) at 2,048, -40.0 ±0.0 (n=4) at 4,096; its " \
        "difference from dense falls with length (-40.0, beyond the noise of ±0.0)" in text
    assert "| snapkv (kv 256) | -" not in text  # only the paper's methods are held against dense
    assert "| 2,048 | 99.0 ±0.0 (n=2) | 90.0 ±0.0 (n=2) | 92.5 ±2.5 (n=2) | 77.5 ±2.5 (n=2) |" in text
    assert "- SnapKV top-C recall: 77.5 ±2.5 (n=2) at 2,048, 45.0 ±5.0 (n=2) at 4,096; falls with length (-32.5, " \
        "beyond the noise of ±11.2)" in text
    assert "- SpecKV top-C recall: 92.5 ±2.5 (n=2) at 2,048, 92.5 ±2.5 (n=2) at 4,096; holds (+0.0" in text
    assert "| top-C recall | +15.0 ±0.0 (n=2) | +47.5 ±2.5 (n=2) |" in text  # SpecKV minus SnapKV, per sample
    assert "- SpecKV's lead over SnapKV in top-C recall: +15.0 ±0.0 (n=2) at 2,048, +47.5 ±2.5 (n=2) at 4,096; the " \
        "lead grows with length (+32.5, beyond the noise of ±5.0)" in text
    assert (out / "agreement_by_length.png").read_bytes()[:4] == b"\x89PNG"


def test_the_cross_length_report_names_a_wrong_agreement_folder_before_writing(tmp_path):
    folders = [write_results(tmp_path / f"ruler-{n}", n, {("dense", None, None): [100]}) for n in (2048, 4096)]
    out = tmp_path / "by-length"
    missing = CliRunner().invoke(app, ["eval", "report", *map(str, folders), "--agreement", str(folders[0]),
                                       "--out", str(out)])
    assert missing.exit_code == 2 and "has no agreement rows" in " ".join(missing.stderr.split())
    assert not (out / "report.md").exists()  # nothing written
    single = CliRunner().invoke(app, ["eval", "report", str(folders[0]), "--agreement", str(folders[1])])
    assert single.exit_code == 2 and "give two or more results folders" in " ".join(single.stderr.split())
    assert not (folders[0] / "summary.md").exists()


def test_a_margin_verdict_calls_a_lead_gone_or_unclear_only_against_its_noise():
    def at(mean, error, n=10):
        return report.Estimate(mean, error, n)

    gone = report.verdict("speckv", "snapkv", "budget", 256, [(2048, at(30, 4)), (8192, at(5, 4))])
    assert gone.endswith("the lead is gone at the longest length")
    unclear = report.verdict("specpc", "specprefill", "prompt_budget", 512, [(2048, at(3, 5)), (4096, at(6, 12))])
    assert unclear.endswith("no clear lead at these lengths") and "at a prompt budget of 512" in unclear
    shrinks = report.verdict("speckv", "snapkv", "budget", 128, [(2048, at(60, 3)), (4096, at(40, 3))])
    assert "the lead shrinks with length (-20.0, beyond the noise of ±8.5)" in shrinks
    single = report.verdict("speckv", "snapkv", "budget", 128, [(2048, at(60, None, 1)), (4096, at(40, 3))])
    assert single.endswith("too few samples to call a trend")


def test_a_second_command_into_a_folder_adds_its_settings_to_the_config(tmp_path):
    for labels, samples in ((["dense", "snapkv kv=128"], 5), (["speckv-pc kv=256 prompt=1024", "dense"], 3)):
        runner.run(None, [], [], tmp_path, {"settings": labels, "samples": samples})  # nothing left to run
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["settings"] == ["dense", "snapkv kv=128", "speckv-pc kv=256 prompt=1024"]
    assert config["samples"] == 3


def good_row(key: str, method: str, score: float, task: str = "vt", length: int = 2048) -> dict:
    return {"key": key, "sample": key.split("|")[0], "task": task, "length": length, "method": method,
            "budget": None if method == "dense" else 64, "prompt_budget": None, "score": score}


def test_the_report_skips_what_is_not_a_result_row_and_counts_a_repeated_row_once(tmp_path):
    lines = [json.dumps(good_row("a|dense", "dense", 100.0)).encode(), json.dumps(good_row("b|dense", "dense", 50.0)).encode(),
             json.dumps(good_row("a|snapkv", "snapkv", 0.0)).encode(),
             b"[1, 2]", b'{"method": "dense", "score": 3}', json.dumps({**good_row("c|dense", "dense", 1), "score": None}).encode(),
             json.dumps({**good_row("d|dense", "dense", 1), "score": "high"}).encode(), b"\xff\xfe not text", b"{oops",
             json.dumps(good_row("a|dense", "dense", 100.0)).encode()]  # the same row again: two runs into one folder
    (tmp_path / "results.jsonl").write_bytes(b"\n".join(lines) + b'\n{"key": "e|dense", "ta')  # a run still writing
    warnings: list[str] = []
    summary, _, _ = report.report(tmp_path, warn=warnings.append)
    assert "| dense | 75.0 (n=2) | 75.0 (n=2) |" in summary.read_text()  # neither doubled nor broken
    assert len(warnings) == 2, warnings
    assert "skipped 6 line(s)" in warnings[0] and "line 4: a JSON list, not an object" in warnings[0]
    assert "line 5: no task" in warnings[0] and "line 6: score is None, not a number" in warnings[0]
    assert "1 row(s) repeat a result already read" in warnings[1] and "line 10" in warnings[1]
    result = CliRunner().invoke(app, ["eval", "report", str(tmp_path)])
    assert result.exit_code == 0 and "warning: skipped 6 line(s)" in result.stderr


def test_the_cross_length_report_counts_two_folders_of_one_length_once_and_refuses_a_missing_folder(tmp_path):
    settings = {("dense", None, None): [100, 80], ("snapkv", 128, None): [40, 20]}
    first = write_results(tmp_path / "a", 2048, settings)
    again = write_results(tmp_path / "b", 2048, settings)  # the same run copied: the same rows
    other = write_results(tmp_path / "c", 4096, settings)
    result = CliRunner().invoke(app, ["eval", "report", str(first), str(again), str(other), "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert "4 row(s) repeat a result already read" in " ".join(result.stderr.split())
    assert "| dense | 90.0 (n=2) | 90.0 (n=2) |" in (tmp_path / "r" / "report.md").read_text()
    result = CliRunner().invoke(app, ["eval", "report", str(first), str(tmp_path / "typo"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "typo is not a results folder (it does not exist)" in " ".join(result.stderr.split())


def test_one_run_at_a_time_writes_into_a_folder(qwen_pair, samples, tmp_path):
    from draftkv.jsonl import exclusive

    out = tmp_path / "run"
    with exclusive(out):  # another run holds the folder
        with pytest.raises(ConfigError, match=r"another run is writing to .*run \(pid \d+, since"):
            runner.run(qwen_pair, samples[:1], SETTINGS[:1], out, {})
        result = CliRunner().invoke(app, ["eval", "ruler", "--length", "400", "--samples", "1", "--out", str(out),
                                          "--target", str(tmp_path / "missing")])
        assert result.exit_code == 2 and "another run is writing to" in " ".join(result.stderr.split())
        assert not (out / "results.jsonl").exists()
    path = runner.run(qwen_pair, samples[:1], SETTINGS[:1], out, {})  # free again once the other run is done
    assert len(read_rows(path)) == 1


def test_a_report_that_cannot_be_written_says_what_was_kept(tmp_path):
    rows = [good_row("a|dense", "dense", 100.0), good_row("a|snapkv", "snapkv", 50.0)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = (tmp_path / "results.jsonl").read_bytes()
    (tmp_path / "summary.csv").symlink_to("/dev/full")  # a disk with no space left, for this file
    with pytest.raises(ConfigError, match="cannot write the report into .*No space left on device.*results.jsonl is untouched"):
        report.report(tmp_path)
    assert (tmp_path / "results.jsonl").read_bytes() == before
    result = CliRunner().invoke(app, ["eval", "report", str(tmp_path)])
    assert result.exit_code == 2 and "No space left on device" in " ".join(result.stderr.split())
    assert "Traceback" not in result.output


def test_a_dump_that_cannot_be_written_leaves_no_half_file(qwen_pair, tmp_path):
    qwen_pair.target.model.save_pretrained(tmp_path / "target")
    qwen_pair.tokenizer.save_pretrained(tmp_path / "target")
    dump = tmp_path / "samples.jsonl"
    command = ["eval", "ruler", "--length", "400", "--samples", "1", "--tasks", "vt", "--dump", str(dump),
               "--target", str(tmp_path / "target")]
    (tmp_path / "samples.jsonl.partial").symlink_to("/dev/full")  # no space left for the file being written
    result = CliRunner().invoke(app, command)
    output = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "cannot write the samples to" in output and "No space left on device" in output
    assert "no samples file was written" in output and not dump.exists()
    assert not (tmp_path / "samples.jsonl.partial").exists()
    result = CliRunner().invoke(app, command)  # with room again, the same command writes it
    assert result.exit_code == 0 and len(dump.read_text().splitlines()) == 1


def test_the_report_draws_the_curve_of_score_against_compression_ratio(tmp_path):
    scores = {  # setting: (kv entries kept, score on sample a, on sample b)
        ("dense", None, None): (4000, 100.0, 100.0),
        ("snapkv", 0.5, None): (2000, 50.0, 0.0), ("snapkv", 256, None): (256, 0.0, 0.0),
        ("keydiff", 0.5, None): (2000, 100.0, 0.0), ("keydiff", 256, None): (256, 0.0, 50.0),
        ("speckv", 0.5, None): (2000, 100.0, 100.0), ("speckv", 256, None): (256, 100.0, 0.0),
        ("specpc", None, 0.25): (1000, 0.0, 100.0), ("speckv-pc", 0.5, 0.5): (1000, 100.0, 100.0)}
    rows = [{"key": f"{sample}|{setting}", "sample": sample, "task": "vt", "method": setting[0], "budget": setting[1],
             "prompt_budget": setting[2], "score": values[1 + i], "stats": {"kv_entries": values[0]}}
            for setting, values in scores.items() for i, sample in enumerate("ab")]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = report.report(tmp_path)[0].read_text().split("## Against the compression ratio")[1]
    assert "| method | 0.50 (0.5 kept) | 0.75 (0.25 kept) | 256 entries |" in text
    assert "| dense | 100.0 (n=2) | | |" in text
    assert "| snapkv | 25.0 | - | 0.0 |" in text
    assert "| speckv-pc | - | 100.0 (kv 0.5, prompt 0.5) | - |" in text  # a cascade keeps its KV share of its prompt share
    # The best baseline of each column: keydiff at 0.5 (50 against snapkv's 25), keydiff at 256 (25 against 0).
    assert "| speckv | +50.0 ±50.0 vs keydiff (1/0) | - | +25.0 ±75.0 vs keydiff (1/1) |" in text
    assert "| specpc | - | - | - |" in text  # no baseline ran at a quarter kept
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    one_budget = [row for row in rows if row["budget"] in (None, 0.5) and row["prompt_budget"] is None]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in one_budget))
    assert "compression ratio" not in report.report(tmp_path)[0].read_text()  # one column: no curve
