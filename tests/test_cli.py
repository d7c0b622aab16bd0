"""The command line on tiny models saved to folders (the same path a user's local model takes)."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_pair
from tiny import long_context
from typer.testing import CliRunner

from draftkv.api import generate
from draftkv.cli import app

runner = CliRunner()
QUESTION = "what is the magic number?"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    pair = tiny_pair("qwen2")
    root = tmp_path_factory.mktemp("models")
    for role, loaded in (("target", pair.target), ("draft", pair.draft)):
        loaded.model.save_pretrained(root / role)
        loaded.tokenizer.save_pretrained(root / role)
    context = root / "context.txt"
    context.write_text(long_context(260), encoding="utf-8")
    return {"target": str(root / "target"), "draft": str(root / "draft"), "context": str(context), "pair": pair}


def invoke(folders, *args, **kwargs):
    """`draftkv generate` on the folders, in float32 as the Python pair they are compared with runs."""
    base = ["generate", "--target", folders["target"], "--draft", folders["draft"], "--max-new-tokens", "8"]
    dtype = [] if "--dtype" in args else ["--dtype", "float32"]
    return runner.invoke(app, [*base, *dtype, *args], **kwargs)


def test_the_default_dtype_is_what_this_machine_measures_fastest_and_is_named(folders):
    from draftkv.models import cpu_dtype

    result = invoke(folders, "--context-file", folders["context"], "-q", QUESTION, "--method", "snapkv",
                    "--budget", "64", "--dtype", "auto", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["dtype"] == cpu_dtype().dtype in ("bfloat16", "float32")
    plain = invoke(folders, "--context-file", folders["context"], "-q", QUESTION, "--method", "snapkv",
                   "--budget", "64")
    assert plain.exit_code == 0 and " in float32 (" in plain.stderr  # the stats line names it
    bad = invoke(folders, "-q", QUESTION, "--dtype", "int8")
    assert bad.exit_code == 2 and "Unknown dtype 'int8'; allowed: auto, float32" in bad.output


def test_generate_json_equals_the_python_api(folders):
    result = invoke(folders, "--context-file", folders["context"], "-q", QUESTION, "--method", "speckv",
                    "--budget", "64", "--window", "8", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["stats"]["compressed"] and payload["stats"]["kv_entries"] == 64
    assert payload["stats"]["method"] == "speckv" and payload["stats"]["lookahead_tokens"] > 0
    with open(folders["context"], encoding="utf-8") as handle:
        context = handle.read()
    expected = generate(folders["pair"], context, QUESTION, method="speckv", budget=64, window=8, max_new_tokens=8)
    assert payload["token_ids"] == expected.token_ids and payload["text"] == expected.text


def test_allocation_option_equals_the_python_api(folders):
    result = invoke(folders, "--context-file", folders["context"], "-q", QUESTION, "--method", "snapkv",
                    "--budget", "64", "--window", "8", "--allocation", "global", "--json")
    assert result.exit_code == 0, result.output
    with open(folders["context"], encoding="utf-8") as handle:
        context = handle.read()
    expected = generate(folders["pair"], context, QUESTION, method="snapkv", budget=64, window=8,
                        allocation="global", max_new_tokens=8)
    uniform = generate(folders["pair"], context, QUESTION, method="snapkv", budget=64, window=8, max_new_tokens=8)
    payload = json.loads(result.stdout)
    assert payload["token_ids"] == expected.token_ids
    assert (payload["stats"]["kv_entries"], payload["stats"]["kv_bytes"]) == (64, expected.stats.kv_bytes)
    assert any(a.shape != b.shape or not bool((a == b).all())  # the global threshold spread them otherwise
               for a, b in zip(expected.kept_positions, uniform.kept_positions, strict=True))


def test_plain_stream_and_stdin_give_the_same_answer(folders):
    with open(folders["context"], encoding="utf-8") as handle:
        context = handle.read()
    plain = invoke(folders, "--context-file", folders["context"], "-q", QUESTION, "--budget", "0.3")
    streamed = invoke(folders, "--context-file", folders["context"], "-q", QUESTION, "--budget", "0.3", "--stream")
    piped = invoke(folders, "-q", QUESTION, "--budget", "0.3", input=context)
    assert plain.exit_code == streamed.exit_code == piped.exit_code == 0, plain.output
    assert plain.stdout == streamed.stdout == piped.stdout
    assert "[speckv] prompt" in plain.stderr and "KV" in plain.stderr


def test_dense_needs_no_draft_and_budget_ratio_parses(folders):
    result = runner.invoke(app, ["generate", "--target", folders["target"], "--draft", "/nonexistent",
                                 "--method", "dense", "--context-file", folders["context"], "-q", QUESTION,
                                 "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["compressed"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "nope"], "unknown method 'nope'"),
        (["--budget", "abc"], "token count like 256"),
        (["--budget", "0"], "at least 1"),
        (["--budget", "1.5"], r"(0, 1]"),
        (["--budget", "64", "--window", "64"], "smaller than the budget"),
        (["--budget", "64", "--kernel", "4"], "odd"),
        (["--param", "budgett=3"], "no parameter 'budgett'"),
        (["--param", "nonsense"], "KEY=VALUE"),
        (["--allocation", "even"], "allocation must be one of uniform, pyramid, ada, global"),
        (["--method", "streamingllm", "--allocation", "global"], "no parameter 'allocation'"),
        (["--context-file", "/no/such/file.txt"], "does not exist"),
    ],
)
def test_bad_input_exits_2_with_a_message(folders, args, message):
    result = invoke(folders, "-q", QUESTION, *args, input="some context")
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output


def test_empty_prompt_and_bad_model_paths(folders):
    empty = invoke(folders, "--context", "", "-q", "")
    assert empty.exit_code == 2 and "empty" in empty.stderr
    missing = runner.invoke(app, ["generate", "--target", "/no/such/model", "--method", "dense", "-q", "hi",
                                  "--context", "x"])
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "not an embedded model" in missing.stderr


def test_methods_and_models_commands():
    methods = runner.invoke(app, ["methods"])
    assert methods.exit_code == 0
    for name in ("dense", "snapkv", "speckv", "budget", "window", "lookahead", "max_lookahead"):
        assert name in methods.stdout
    from draftkv.models import cpu_dtype

    choice = cpu_dtype()  # decided (or read) on this machine: `models` says what auto runs in, and why
    models = runner.invoke(app, ["models"])
    assert models.exit_code == 0
    assert "qwen2.5-coder-1.5b-instruct" in models.stdout and "qwen2.5-coder-0.5b-instruct" in models.stdout
    assert f"dtype auto on {choice.key}: {choice.dtype} ({choice.reason})" in models.stdout
    from draftkv.models import embedded_status

    cached = [row for row in embedded_status() if row["cached"]]
    assert all(f"{row['name']} in {row['stored_dtype']}" in models.stdout for row in cached)
    assert runner.invoke(app, ["--version"]).stdout.startswith("draftkv ")


def test_compress_prints_text_ids_and_json(folders):
    base = ["compress", "--target", folders["target"], "--draft", folders["draft"], "--context-file",
            folders["context"], "-q", QUESTION, "--budget", "120", "--window", "16", "--kernel", "7",
            "-p", "neighbourhood=8", "-p", "start_layer=0"]
    as_json = runner.invoke(app, [*base, "--json"])
    assert as_json.exit_code == 0, as_json.output
    payload = json.loads(as_json.stdout)
    assert payload["kept_tokens"] == 120 and payload["method"] == "specpc" and 0 < payload["ratio"] < 1
    text = runner.invoke(app, base)
    assert text.exit_code == 0 and text.stdout.rstrip("\n") == payload["text"]
    assert "kept 120 of" in text.stderr and "spans" in text.stderr
    ids = runner.invoke(app, [*base, "--ids"])
    assert ids.exit_code == 0 and [int(i) for i in ids.stdout.split()] == payload["token_ids"]
    refused = runner.invoke(app, [*base[:-8], "--method", "speckv", "--budget", "64"])
    assert refused.exit_code == 2 and "does not compress prompts" in refused.stderr


def test_query_agnostic_answers_several_questions(folders):
    from draftkv.context import compress_context

    result = invoke(folders, "--context-file", folders["context"], "--method", "snapkv", "--budget", "64",
                    "--window", "8", "--ask", QUESTION, "--ask", "who is on monday?", "--json")
    assert result.exit_code == 0, result.output
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert [a["question"] for a in answers] == [QUESTION, "who is on monday?"]
    with open(folders["context"], encoding="utf-8") as handle:
        shared = compress_context(folders["pair"], handle.read(), method="snapkv", budget=64, window=8,
                                  max_new_tokens=8)
    assert [a["token_ids"] for a in answers] == [shared.ask(q, max_new_tokens=8).token_ids for q in
                                                 (QUESTION, "who is on monday?")]
    assert "query-agnostic" in answers[0]["stats"]["note"]
    sampled = invoke(folders, "--context-file", folders["context"], "--method", "snapkv", "--budget", "64",
                     "--window", "8", "--ask", QUESTION, "--temperature", "1.2", "--seed", "5", "--stop", "zz",
                     "--json")
    assert sampled.exit_code == 0, sampled.output
    assert json.loads(sampled.stdout)["token_ids"] == shared.ask(
        QUESTION, max_new_tokens=8, temperature=1.2, seed=5, stop="zz").token_ids  # --temperature, --seed, --stop
    assert json.loads(sampled.stdout)["token_ids"] != answers[0]["token_ids"]  # sampled, not greedy


def no_models(monkeypatch):
    """Fail the test if a model is loaded: these checks need none."""
    from draftkv.models import loading

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before a check that needs none")

    monkeypatch.setattr(loading, "load_pair", refuse)


BAD_EVAL = [  # arguments of `draftkv eval ruler`, words the error must say
    (["--length", ","], "--length names nothing"),
    (["--length", "2048", "--samples", "0"], "--samples must be at least 1"),
    (["--length", "2048", "--tasks", ""], "--tasks names nothing"),
    (["--length", "2048", "--tasks", "nope"], "unknown RULER task(s) nope"),
    (["--length", "2048", "--methods", ""], "--methods names nothing"),
    (["--length", "2048", "--budgets", "a"], "--budgets a comma-separated list of budgets"),
    (["--length", "2048", "--methods", "speckv-pc@256"], "write speckv-pc@KV/PROMPT"),
    (["--length", "2048", "--methods", "snapkv,snapkv"], "named twice: snapkv kv=256"),
    (["--length", "2048", "--decode", "graph", "--dump", "samples.jsonl"], "decode backend 'graph' is not one of"),
]


@pytest.mark.parametrize(("args", "words"), BAD_EVAL, ids=[w for _, w in BAD_EVAL])
def test_eval_arguments_are_checked_before_any_model_loads(monkeypatch, tmp_path, args, words):
    no_models(monkeypatch)
    result = runner.invoke(app, ["eval", "ruler", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and words in result.output, result.output


BAD_AGREEMENT = [  # arguments of `draftkv analyze agreement`, words the error must say
    (["--tasks", "vt,nope"], "unknown RULER task(s) nope"),
    (["--tasks", ","], "--tasks names nothing"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--length", "0"], "--length must be at least 1"),
]


@pytest.mark.parametrize(("args", "words"), BAD_AGREEMENT, ids=[w for _, w in BAD_AGREEMENT])
def test_agreement_arguments_are_checked_before_any_model_loads(monkeypatch, tmp_path, args, words):
    no_models(monkeypatch)
    result = runner.invoke(app, ["analyze", "agreement", *args, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and words in result.output, result.output


def test_an_output_folder_that_cannot_be_written_is_named_before_any_model_loads(monkeypatch, tmp_path):
    no_models(monkeypatch)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    result = runner.invoke(app, ["eval", "ruler", "--length", "2048", "--out", str(blocked / "results")])
    # The message wraps where the (temporary, variable-length) path ends: compare with whitespace squeezed.
    assert result.exit_code == 2 and "cannot be written to" in " ".join(result.output.split()), result.output


BAD_GENERATE = [
    (["-q", QUESTION, "--max-new-tokens", "0"], "max_new_tokens must be an int >= 1"),
    (["-q", QUESTION, "--temperature", "-1"], "temperature must be a number >= 0"),
    (["-q", QUESTION, "--top-p", "2"], "top_p must be a number in (0, 1]"),
    (["--ask", ""], "an --ask question is empty"),
    (["--ask", "who?", "--speculate", "4"], "--speculate does not apply with --ask"),
    (["--context", " "], "the prompt is empty"),
    (["-q", QUESTION, "--decode", "graph"], "decode backend 'graph' is not one of auto,"),
    (["-q", QUESTION, "--method", "snapkv", "--compression-ratio", "1.5"], "compression_ratio must be a number"),
    (["-q", QUESTION, "--method", "kvzip", "-p", "instruction=a\ud800"], "instruction holds '\\ud800'"),
]


def test_compress_refuses_a_method_that_keeps_every_prompt_token_before_any_model_loads(monkeypatch, folders):
    no_models(monkeypatch)
    result = runner.invoke(app, ["compress", "--target", folders["target"], "--context", "alpha", "-m", "kvzip"])
    assert result.exit_code == 2 and "'kvzip' does not compress prompts" in result.output, result.output


@pytest.mark.parametrize(("args", "words"), BAD_GENERATE, ids=[w for _, w in BAD_GENERATE])
def test_generate_arguments_are_checked_before_any_model_loads(monkeypatch, folders, args, words):
    no_models(monkeypatch)
    result = runner.invoke(app, ["generate", "--target", folders["target"], "--context", "alpha bravo", *args])
    assert result.exit_code == 2 and words in result.output, result.output


def test_eval_loads_a_draft_only_for_methods_that_use_it(monkeypatch, tmp_path):
    from draftkv.errors import ConfigError
    from draftkv.models import loading

    asked = []

    def record(target, draft, **_kwargs):
        asked.append(draft)
        raise ConfigError("stop here")

    monkeypatch.setattr(loading, "load_pair", record)
    for methods, draft in (("keep-last,dense,snapkv", None), ("keep-last,speckv", "qwen2.5-coder-0.5b-instruct")):
        runner.invoke(app, ["eval", "ruler", "--length", "2048", "--methods", methods, "--out", str(tmp_path)])
        assert asked[-1] == draft


def test_a_prompt_past_the_context_is_refused_before_any_weight_is_read(monkeypatch, folders, tmp_path):
    """A check that needs only the tokenizer (and the config) runs before the weights load."""
    import transformers

    def no_weights(*_args, **_kwargs):
        raise AssertionError("weights were read before a check that needs only the tokenizer")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    huge = tmp_path / "huge.txt"
    huge.write_text(long_context(9000), encoding="utf-8")
    result = runner.invoke(app, ["generate", "--target", folders["target"], "--draft", folders["draft"],
                                 "--context-file", str(huge), "-q", QUESTION, "--method", "dense"])
    assert result.exit_code == 2 and "context limit of 4096 tokens" in " ".join(result.output.split()), result.output


def test_an_eval_length_past_the_context_is_refused_before_any_weight_is_read(monkeypatch, folders, tmp_path):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *_a, **_k: (_ for _ in ()).throw(AssertionError("weights were read")))
    result = runner.invoke(app, ["eval", "ruler", "--target", folders["target"], "--draft", folders["draft"],
                                 "--length", "8192", "--tasks", "vt", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "context limit of 4096 tokens" in " ".join(result.output.split()), result.output


def test_dumping_ruler_samples_reads_the_tokenizer_only(monkeypatch, folders, tmp_path):
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *_a, **_k: (_ for _ in ()).throw(AssertionError("weights were read")))
    dump = tmp_path / "samples.jsonl"
    base = ["eval", "ruler", "--target", folders["target"], "--tasks", "vt,niah_single_1", "--samples", "2"]
    result = runner.invoke(app, [*base, "--length", "600", "--dump", str(dump)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert [row["task"] for row in rows] == ["vt", "niah_single_1", "vt", "niah_single_1"]
    too_long = runner.invoke(app, [*base, "--length", "8192", "--dump", str(dump)])
    assert too_long.exit_code == 2 and "context limit of 4096 tokens" in " ".join(too_long.output.split())
    assert len(dump.read_text().splitlines()) == 4  # the refused command left the file as it was


def test_output_that_cannot_be_written_is_one_line_not_a_traceback(folders):
    """`draftkv generate --json > file` on a full disk: status 1 and a message on stderr."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "draftkv", "generate", "--target", folders["target"],
                                 "--method", "dense", "--context-file", folders["context"], "-q", QUESTION,
                                 "--max-new-tokens", "4", "--json"], stdout=full, stderr=subprocess.PIPE, text=True,
                                timeout=300)
    assert result.returncode == 1
    assert "cannot write the output (No space left on device)" in " ".join(result.stderr.split())
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr


FAST = [  # commands that need no model, so they must answer without torch or transformers
    ["--help"], ["methods"], ["models"], ["generate", "--help"], ["eval", "ruler", "--help"],
    ["generate", "-m", "nosuch", "-q", "x"], ["generate", "--budget", "0", "-q", "x"],
    ["generate", "--temperature", "-1", "-q", "x"], ["compress", "--decode", "fast", "-q", "x"],
    ["eval", "ruler", "--length", "2048", "--samples", "0"], ["eval", "ruler", "--methods", "snapkv,snapkv"],
    ["bench", "--speculate", "99"], ["bench", "--lengths", ","],
    ["serve", "--method", "nosuch"], ["serve", "--max-tokens", "9", "--max-tokens-limit", "5"],
    ["serve", "--upstream", "ftp://box/v1"], ["serve", "--temperature", "3"],
    ["generate", "--dtype", "int8", "-q", "x"], ["serve", "--dtype", "double"], ["bench", "--dtype", "fp8"],
]


@pytest.mark.parametrize("args", FAST, ids=" ".join)
def test_commands_that_need_no_model_import_no_torch(args):
    """`draftkv --help`, the registries and every argument check answer without the heavy imports."""
    import subprocess
    import sys

    probe = ("import atexit, sys\n"
             "atexit.register(lambda: print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules)))\n"
             "from draftkv.cli import run\n"
             f"sys.argv = ['draftkv', *{args!r}]\n"
             "run()\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert done.returncode in (0, 2), done.stderr[-2000:]
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    if done.returncode == 2:
        assert "error" in done.stderr.lower()


def test_serve_without_the_server_packages_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name in ("fastapi", "psutil")
                        else real(name, *rest))
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 2
    assert "the server needs fastapi, psutil, which are not installed; pip install 'draftkv[serve]'" in \
        " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)
