"""The benchmark's measurement code, on tiny models: the table, the ratios, failures, resume, the
memory subprocess and the command line."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import tiny_pair
from typer.testing import CliRunner

from draftkv import api, bench
from draftkv.api import generate_batch
from draftkv.cli import app
from draftkv.errors import ConfigError
from draftkv.types import Request

METHODS = [("dense", {}), ("snapkv", {"budget": 64}), ("speckv", {"budget": 64}),
           ("specpc", {"budget": 128, "start_layer": 0})]


@pytest.fixture(scope="module")
def pair():
    return tiny_pair("qwen2", max_positions=1200)


@pytest.fixture(scope="module")
def swept(pair, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rows = bench.run_bench(pair, out, lengths=[500, 900], methods=[*METHODS, ("specpc", {"budget": 128, "start_layer": 8})],
                           new_tokens=4, repeats=2)
    markdown, summary = bench.report(out, {"note": "test"})
    return out, rows, markdown, summary


def test_methods_are_named_with_their_parameters():
    chosen = bench.method_configs(["speckv:verify_lookahead=false", "speckv", "specpc"], 64, 128)
    assert chosen == [("dense", {}), ("speckv", {"verify_lookahead": False, "budget": 64}), ("speckv", {"budget": 64}),
                      ("specpc", {"budget": 128})]
    labels = [bench.Config(name, tuple(sorted(params.items())), 500, 1).label for name, params in chosen]
    assert len(set(labels)) == len(labels)
    with pytest.raises(ConfigError, match="has no parameter"):
        bench.method_configs(["speckv:nope=1"], 64, 128)


def test_every_configuration_is_measured_with_every_column(swept):
    out, rows, markdown, summary = swept
    measured = [r for r in rows if "error" not in r]
    assert len(measured) == 2 * 4 * 2  # lengths x working methods x repeats
    assert all(r["new_tokens"] == 4 for r in measured)  # end-of-text is ignored: every run decodes 4
    assert {r["dtype"] for r in rows} == {"float32"} and all(c["dtype"] == "float32" for c in summary)
    for row in measured:  # whole notes paragraphs fill each length from below
        assert row["length"] - 200 < row["prompt_tokens"] <= row["length"]
    header = markdown.read_text().splitlines()[2]
    for name, _, _ in bench.COLUMNS:
        assert name in header
    good = [c for c in summary if not c["errors"]]
    for cell in good:
        assert cell["repeats"] == 2
        for _, key, _ in bench.COLUMNS:
            # CPU memory needs the subprocess (tested below); acceptance, speculation (tested below)
            if key not in ("peak_memory_bytes", "peak_memory_total_bytes", "acceptance"):
                assert key in cell, (cell["label"], key)
                assert cell[key]["min"] <= cell[key]["median"] <= cell[key]["max"]


def test_ratios_to_dense_are_one_for_dense_and_follow_the_budgets(swept):
    _, _, _, summary = swept
    for cell in summary:
        if cell["method"] == "dense":
            assert all(cell[key]["ratio"] == 1.0 for _, key, _ in bench.COLUMNS if key in cell and cell[key]["median"])
        elif cell["method"] == "speckv":
            assert cell["kv_bytes"]["ratio"] == pytest.approx(64 / cell["prompt_tokens"])
            assert cell["kv_bytes_stored"] == 64 * cell["kv_bytes_dense"] // cell["prompt_tokens"]
        elif cell["method"] == "specpc" and not cell["errors"]:
            assert cell["kept_prompt_tokens"] == 128 and cell["kv_bytes"]["ratio"] < 1


def test_a_failing_configuration_is_reported_and_the_sweep_goes_on(swept):
    _, rows, markdown, summary = swept
    failed = [c for c in summary if c["errors"]]
    assert [c["label"] for c in failed] == ["specpc(budget=128,start_layer=8)"] * 2
    assert "start_layer" in failed[0]["errors"][0]
    assert "error: " in markdown.read_text()
    assert {c["method"] for c in summary if c["repeats"] == 2} == {"dense", "snapkv", "speckv", "specpc"}


def test_targets_are_checked_from_the_summary(swept):
    _, _, markdown, _ = swept
    text = markdown.read_text()
    assert "speckv(budget=" in text and "budget / prompt" in text and "scoring" in text  # each SpecKV setting by name
    assert "target within 1%: met" in text


def test_a_second_run_resumes_and_measures_nothing(swept, pair, monkeypatch):
    out, rows, _, _ = swept

    def forbidden(*_args, **_kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(bench, "measure", forbidden)
    monkeypatch.setattr(api, "generate_batch", forbidden)  # not even the warm-up
    again = bench.run_bench(pair, out, lengths=[500, 900], methods=[*METHODS, ("specpc", {"budget": 128, "start_layer": 8})],
                            new_tokens=4, repeats=2)
    assert len(again) == len(rows)


def test_a_torn_last_line_is_cut_before_new_rows(pair, tmp_path):
    first = {"key": "old", "method": "dense", "label": "dense", "params": {}, "length": 1, "batch": 1, "repeat": 0,
             "error": "x"}
    (tmp_path / "runs.jsonl").write_text(json.dumps(first) + "\n{\"key\": \"to", encoding="utf-8")
    rows = bench.run_bench(pair, tmp_path, lengths=[500], methods=[("dense", {})], new_tokens=2, repeats=1)
    assert [row["key"] for row in bench.read_rows(tmp_path / "runs.jsonl")] == ["old", "500|1|dense|float32|0"]
    assert len(rows) == 2


def test_memory_is_measured_in_a_fresh_subprocess(pair, tmp_path):
    for role, loaded in (("target", pair.target), ("draft", pair.draft)):
        loaded.model.save_pretrained(tmp_path / role)
        loaded.tokenizer.save_pretrained(tmp_path / role)
    spec = {"target": str(tmp_path / "target"), "draft": str(tmp_path / "draft"), "device": "cpu", "dtype": None}
    out = tmp_path / "out"
    rows = bench.run_bench(pair, out, lengths=[300], methods=[("dense", {}), ("specpc", {"budget": 96, "start_layer": 0})],
                           new_tokens=3, repeats=1, memory_spec=spec)
    probes = [r for r in rows if r["repeat"] == -1]
    assert len(probes) == 2 and all("error" not in r for r in probes), probes
    assert all(r["peak_memory_total_bytes"] >= r["rss_before_bytes"] > 0 for r in probes)
    assert all(0 <= r["target_stage_peak_bytes"] <= r["peak_memory_bytes"] for r in probes)
    assert all(r["e2e_s"] >= r["ttft_s"] > 0 and r["new_tokens"] == 3 for r in probes)  # the probe's own run
    _, summary = bench.report(out)
    assert all("peak_memory_bytes" in c and not c.get("timed_in_probe") for c in summary)  # timed repeats win


def test_a_sweep_without_timed_repeats_reports_the_probes_runs(pair, tmp_path, monkeypatch):
    """At prompts where one run takes many minutes, `--repeats 0` times each configuration once, in its
    memory probe's fresh process; the table says so."""
    def probe(spec):
        e2e = 10.0 if spec["method"] == "dense" else 4.0
        return {"peak_memory_bytes": 100, "peak_memory_total_bytes": 1100, "target_stage_peak_bytes": 100,
                "rss_before_bytes": 1000, "e2e_s": e2e, "ttft_s": e2e / 2, "decode_ms_per_token": 50.0,
                "prompt_tokens": 290, "kept_prompt_tokens": 290, "kv_entries": 290, "kv_bytes_dense": 2000,
                "kv_bytes": 2000, "kv_bytes_stored": 2000, "correct": True, "timings": {"decode": 1.0},
                "tokens_per_s": 1.0, "draft_share": 0.0}

    monkeypatch.setattr(bench, "probe_in_subprocess", probe)
    spec = {"target": "t", "draft": "d", "device": "cpu", "dtype": "float32"}
    bench.run_bench(pair, tmp_path, lengths=[300], methods=[("dense", {}), ("specpc", {"budget": 96})],
                    new_tokens=3, repeats=0, memory_spec=spec)
    markdown, summary = bench.report(tmp_path)
    assert all(c["timed_in_probe"] and c["repeats"] == 1 for c in summary)
    assert {c["method"]: c["e2e_s"]["ratio"] for c in summary} == {"dense": 1.0, "specpc": 0.4}
    assert "| 1 (probe) |" in markdown.read_text(encoding="utf-8")


def test_ignore_eos_generates_exactly_the_new_tokens(pair):
    request = Request(context="alpha bravo", question="what?", max_new_tokens=9, ignore_eos=True)
    assert len(generate_batch(pair, [request])[0].token_ids) == 9


def test_lengths_below_the_template_are_refused(pair):
    with pytest.raises(ConfigError, match="length must be above"):
        bench.bench_requests(pair.tokenizer, 10, 1, 4)


def test_the_bench_command_writes_table_json_and_plots(pair, tmp_path):
    for role, loaded in (("target", pair.target), ("draft", pair.draft)):
        loaded.model.save_pretrained(tmp_path / role)
        loaded.tokenizer.save_pretrained(tmp_path / role)
    out = tmp_path / "results"
    base = ["bench", "--target", str(tmp_path / "target"), "--draft", str(tmp_path / "draft"), "--out", str(out)]
    result = CliRunner().invoke(app, [*base, "--lengths", "500,700", "--methods", "snapkv,streamingllm",
                                      "--budget", "48", "--repeats", "1", "--new-tokens", "3", "--batch-sizes", "1,2",
                                      "--no-memory"])
    assert result.exit_code == 0, result.output
    assert "| length | batch | dtype | method | TTFT" in result.stdout and "(1.00)" in result.stdout
    from draftkv.models import cpu_dtype

    assert f"| {cpu_dtype().dtype} | dense |" in result.stdout  # --dtype auto, resolved and named
    for name in ("runs.jsonl", "bench.json", "bench.md", "latency.png", "memory.png", "throughput.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "bench.json").read_text())["summary"]
    assert {(c["method"], c["length"], c["batch"]) for c in summary} == {
        (m, n, b) for m in ("dense", "snapkv", "streamingllm") for n in (500, 700) for b in (1, 2)}
    bad = CliRunner().invoke(app, [*base, "--methods", "nope"])
    assert bad.exit_code == 2 and "unknown method" in bad.output


def test_repeats_zero_runs_only_the_memory_probes(pair, tmp_path, monkeypatch):
    probed = []

    def probe(spec):
        probed.append(spec)
        peak = 100 if spec["method"] == "dense" else 103
        return {"peak_memory_bytes": peak, "peak_memory_total_bytes": 1000 + peak, "target_stage_peak_bytes": peak,
                "rss_before_bytes": 1000}

    def forbidden(*_args, **_kwargs):
        raise AssertionError("a timed run or a warm-up")

    monkeypatch.setattr(bench, "probe_in_subprocess", probe)
    monkeypatch.setattr(bench, "measure", forbidden)
    monkeypatch.setattr(api, "generate_batch", forbidden)
    spec = {"target": "t", "draft": "d", "device": "cpu", "dtype": None}
    rows = bench.run_bench(pair, tmp_path, lengths=[300], methods=[("dense", {}), ("speckv", {"budget": 64})],
                           new_tokens=3, repeats=0, memory_spec=spec)
    assert [row["repeat"] for row in rows] == [-1, -1]
    assert [spec["method"] for spec in probed] == ["dense", "speckv"]
    markdown, summary = bench.report(tmp_path)
    assert {c["label"]: c["peak_memory_bytes"]["ratio"] for c in summary} == {"dense": 1.0, "speckv(budget=64)": 1.03}
    assert "SpecKV target-stage peak memory at length 300 x1: 1.030 of dense's (target <= 1: missed)" in \
        markdown.read_text(encoding="utf-8")
    assert (tmp_path / "memory.png").exists() and not (tmp_path / "latency.png").exists()
    with pytest.raises(ConfigError, match="repeats 0"):
        bench.run_bench(pair, tmp_path, lengths=[300], methods=[("dense", {})], new_tokens=3, repeats=0)


def test_a_resumed_sweep_warms_up_only_what_is_left(pair, tmp_path, monkeypatch):
    bench.run_bench(pair, tmp_path, lengths=[300], methods=[("dense", {})], new_tokens=2, repeats=1)
    ran = []
    generate = api.generate_batch
    monkeypatch.setattr(api, "generate_batch", lambda pair, requests, method, **kw:
                        ran.append(method.name) or generate(pair, requests, method, **kw))
    rows = bench.run_bench(pair, tmp_path, lengths=[300], methods=[("dense", {}), ("snapkv", {"budget": 64})],
                           new_tokens=2, repeats=1)
    assert set(ran) == {"snapkv"}  # its warm-up and its timed run; dense was done
    assert [row["label"] for row in rows] == ["dense", "snapkv(budget=64)"]


def test_every_method_of_a_plot_has_its_own_line_style():
    from draftkv.plotting import line_styles

    labels = ["dense", *(f"method-{i}" for i in range(30))]
    styles = line_styles(labels)
    assert styles["dense"]["color"] == "black"
    assert len({(s["color"], s["marker"]) for s in styles.values()}) == len(labels)
    # Up to 20 methods besides dense differ in colour alone, so a legend reads without the markers.
    assert len({styles[label]["color"] for label in labels[:21]}) == 21


def test_rows_that_cannot_be_written_keep_the_earlier_ones_and_resume(pair, tmp_path, monkeypatch):
    import errno

    bench.run_bench(pair, tmp_path, lengths=[300], methods=[("dense", {})], new_tokens=2, repeats=1)
    kept = (tmp_path / "runs.jsonl").read_bytes()

    def full(_handle, _row):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(bench, "append_row", full)  # the disk fills up
    with pytest.raises(ConfigError, match="cannot write the benchmark rows .*No space left on device.*rows already "
                                          "written are kept"):
        bench.run_bench(pair, tmp_path, lengths=[300], methods=[("dense", {}), ("snapkv", {"budget": 64})],
                        new_tokens=2, repeats=1)
    assert (tmp_path / "runs.jsonl").read_bytes() == kept
    (tmp_path / "bench.md").symlink_to("/dev/full")  # written, never read
    with pytest.raises(ConfigError, match="cannot write the benchmark report .*runs.jsonl is untouched"):
        bench.report(tmp_path)


def test_each_method_runs_with_each_speculation_setting(pair, tmp_path):
    rows = bench.run_bench(pair, tmp_path, lengths=[500], methods=[("dense", {}), ("speckv", {"budget": 64})],
                           new_tokens=6, repeats=1, speculate=[0, 2])
    labels = sorted(row["label"] for row in rows)
    assert labels == ["dense", "dense +speculate=2", "speckv(budget=64)", "speckv(budget=64) +speculate=2"]
    for row in rows:
        assert "error" not in row, row.get("error")
        assert (row["proposed_tokens"] > 0) == (row["speculate"] > 0)
        assert row["acceptance"] is None or 0 <= row["acceptance"] <= 1
    markdown, summary = bench.report(tmp_path, {"note": "test"})
    assert "dense +speculate=2" in markdown.read_text(encoding="utf-8")
    assert [("acceptance" in cell) for cell in summary] == [cell["label"].endswith("+speculate=2") for cell in summary]


def test_auto_speculation_runs_in_the_sweep_and_says_when_it_decoded_plainly(pair, tmp_path, calls_cost_as_measured):
    from draftkv.engine.speculation import CallCosts

    gains = CallCosts({n: 0.03 for n in (1, 2, 3, 5, 9)}, 0.001)  # a call costs the same whatever it reads
    loses = CallCosts({n: 0.03 * n for n in (1, 2, 3, 5, 9)}, 0.03)
    for costs, speculates in [(gains, True), (loses, False)]:
        out = tmp_path / str(speculates)
        rows = bench.run_bench(dataclasses.replace(pair, call_costs=costs), out, lengths=[500],
                               methods=[("dense", {})], new_tokens=6, repeats=1, speculate=["auto"])
        row = next(row for row in rows if row["repeat"] == 0)
        assert row["label"] == "dense +speculate=auto" and row["speculate"] == "auto"
        assert (row["proposed_tokens"] > 0) == speculates
        assert ("auto measured no gain" in row["note"]) == (not speculates)
