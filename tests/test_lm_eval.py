"""draftkv as an lm-evaluation-harness model: both routes (Python and `draftkv lm-eval`) on a tiny local
task, and scores that are the compressed cache's, not the uncompressed model's."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from tiny import long_context
from typer.testing import CliRunner

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from draftkv.cli import app  # noqa: E402
from draftkv.errors import ConfigError  # noqa: E402
from draftkv.lm_eval import DraftKVLM  # noqa: E402

ROOT = Path(__file__).parent.parent
TASKS = ["draftkv_tiny_gen", "draftkv_tiny_mc"]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tasks name their data file from the repository root
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def test_simple_evaluate_runs_generation_and_loglikelihood_tasks(qwen_pair, offline):
    from lm_eval.tasks import TaskManager

    model = DraftKVLM(pair=qwen_pair, method="snapkv", budget=48, window=8, batch_size=2)
    results = lm_eval.simple_evaluate(model=model, tasks=TASKS, task_manager=TaskManager(include_path="tests/lm_eval_tasks"),
                                      limit=3, log_samples=True)
    assert 0 <= results["results"]["draftkv_tiny_gen"]["exact_match,none"] <= 1
    assert 0 <= results["results"]["draftkv_tiny_mc"]["acc,none"] <= 1
    generated = results["samples"]["draftkv_tiny_gen"]
    assert len(generated) == 3 and all(isinstance(s["resps"][0][0], str) for s in generated)
    choices = results["samples"]["draftkv_tiny_mc"][0]["resps"]
    assert len(choices) == 3 and all(isinstance(r[0][0], float) and r[0][0] < 0 for r in choices)


def test_the_lm_eval_command_registers_the_model_and_writes_results(qwen_pair, offline, tmp_path):
    for role, loaded in (("target", qwen_pair.target),):
        loaded.model.save_pretrained(tmp_path / role)
        loaded.tokenizer.save_pretrained(tmp_path / role)
    result = CliRunner().invoke(app, ["lm-eval", "--model", "draftkv", "--model_args",
                                      f"pretrained={tmp_path / 'target'},method=streamingllm,budget=48",
                                      "--tasks", ",".join(TASKS), "--include_path", "tests/lm_eval_tasks",
                                      "--limit", "2", "--output_path", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert written, result.output
    data = json.loads(written[0].read_text())
    assert set(TASKS) <= set(data["results"])
    assert written[0].parent.name.endswith("target")  # lm-eval names the folder after `pretrained`


def test_a_bad_method_argument_fails_before_any_model_loads():
    with pytest.raises(ConfigError, match="unknown method"):
        DraftKVLM(target="/nowhere", method="nope")
    with pytest.raises(ConfigError, match="compression_ratio"):
        DraftKVLM(target="/nowhere", method="snapkv", compression_ratio=2)
    with pytest.raises(ConfigError, match="two targets"):
        DraftKVLM(target="/nowhere", pretrained="/elsewhere")


def test_scores_are_the_compressed_caches(qwen_pair):
    """Dense scores what one pass of the model over context + continuation scores; a budget at least
    the context is dense's score exactly; a small budget scores something else."""
    context = long_context(250, seed=7) + " The magic number is"
    choices = [" 4821.", " 17.", " seven hundred."]
    args = [(context, c) for c in choices]
    dense = DraftKVLM(pair=qwen_pair, method="dense").loglikelihood(requests("loglikelihood", args))
    whole = DraftKVLM(pair=qwen_pair, method="snapkv", budget=10_000).loglikelihood(requests("loglikelihood", args))
    small = DraftKVLM(pair=qwen_pair, method="snapkv", budget=24, window=8).loglikelihood(
        requests("loglikelihood", args))
    assert whole == dense
    assert any(abs(a[0] - b[0]) > 1e-4 for a, b in zip(small, dense, strict=True))
    model, tokenizer = qwen_pair.target.model, qwen_pair.tokenizer
    for (logprob, _), continuation in zip(dense, choices, strict=True):
        context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
        ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
        one_pass = sum(logits[i - 1, ids[i]].item() for i in range(len(context_ids), len(ids)))
        assert logprob == pytest.approx(one_pass, abs=1e-3)


def test_rolling_windows_compress_their_context(qwen_pair):
    text = long_context(300, seed=9)
    dense = DraftKVLM(pair=qwen_pair, method="dense", max_length=128)
    small = DraftKVLM(pair=qwen_pair, method="snapkv", budget=24, window=8, max_length=128)
    whole = DraftKVLM(pair=qwen_pair, method="dense")
    [rolled] = dense.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    [compressed] = small.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    [one] = whole.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert rolled < 0 and compressed < 0 and one < 0
    assert abs(rolled - compressed) > 1e-3  # later windows read a compressed context


def test_generate_until_is_the_executors_answer_with_stop_strings(qwen_pair):
    import draftkv

    context = long_context(200, seed=3) + "\nQuestion: what comes next?\nAnswer:"
    model = DraftKVLM(pair=qwen_pair, method="speckv", budget=48, window=8, batch_size=2)
    texts = model.generate_until(requests("generate_until", [(context, {"until": ["e"], "max_gen_toks": 12}),
                                                             (context[:400], {"until": ["e"], "max_gen_toks": 12})]))
    expected = draftkv.generate(qwen_pair, context, "", method="speckv", budget=48, window=8, max_new_tokens=12,
                                chat_template=False, stop=["e"])
    assert texts[0] == expected.text and "e" not in texts[0]


def test_generate_until_speculates_with_the_draft_and_gives_the_same_text(qwen_pair):
    context = long_context(200, seed=4) + "\nQuestion: what comes next?\nAnswer:"
    asked = requests("generate_until", [(context, {"until": ["\n\n"], "max_gen_toks": 10})])
    plain = DraftKVLM(pair=qwen_pair, method="dense").generate_until(asked)
    fast = DraftKVLM(pair=qwen_pair, method="dense", speculate=3)
    assert fast.pair.speculate == 3
    assert fast.generate_until(asked) == plain


def test_the_chat_template_is_the_tokenizers(qwen_pair):
    model = DraftKVLM(pair=qwen_pair, method="dense")
    history = [{"role": "user", "content": "hi"}]
    assert model.apply_chat_template(history) == qwen_pair.tokenizer.apply_chat_template(
        history, tokenize=False, add_generation_prompt=True)
    assert model.tokenizer_name and model.chat_template(True) == qwen_pair.tokenizer.chat_template


def test_lm_evals_own_models_stay_available_beside_ours():
    from lm_eval.api.registry import get_model

    assert get_model("draftkv") is DraftKVLM
    assert get_model("local-completions").__name__ == "LocalCompletionsAPI"


def test_rolling_windows_follow_lm_evals_at_any_document_length():
    """A document longer than the model's context, at the default max_length (the context): dense scores
    each of lm-eval's windows as one pass of the model over it does."""
    from conftest import tiny_pair
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    pair = tiny_pair("qwen2", max_positions=128)
    model = DraftKVLM(pair=pair, method="dense")
    text = long_context(400, seed=4)
    tokens = model.encode(text)
    assert len(tokens) > 3 * 128
    [total] = model.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    expected = 0.0
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            token_list=tokens, prefix_token=model.prefix_token_id, max_seq_len=128, context_len=1)):
        ids = torch.tensor([context + continuation][:1])[:, :-1]
        assert ids.shape[1] <= 128
        with torch.no_grad():
            logits = torch.log_softmax(pair.target.model(input_ids=ids).logits[0].float(), dim=-1)
        expected += sum(logits[len(context) - 1 + i, token].item() for i, token in enumerate(continuation))
    assert total == pytest.approx(expected, abs=1e-2)
    compressed = DraftKVLM(pair=pair, method="snapkv", budget=24, window=8)
    [smaller] = compressed.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert smaller < 0 and abs(smaller - total) > 1e-3


@pytest.mark.parametrize(("arguments", "words"), [
    ({"batch_size": 0}, "batch_size must be a whole number >= 1 or 'auto'"),
    ({"batch_size": "many"}, "batch_size must be a whole number >= 1 or 'auto'"),
    ({"batch_size": 2.5}, "batch_size must be a whole number"),
    ({"max_length": "abc"}, "max_length must be a whole number >= 2, got 'abc'"),
    ({"max_length": 0}, "max_length must be a whole number >= 2, got 0"),
    ({"max_gen_toks": -1}, "max_gen_toks must be a whole number >= 1"),
    ({"decode": "fast"}, "decode"),
    ({"speculate": 99}, "speculate must be"),
    ({"dtype": "int8"}, "Unknown dtype 'int8'; allowed: auto, float32"),
])
def test_bad_model_arguments_are_named_before_any_model_loads(arguments, words):
    with pytest.raises(ConfigError) as raised:
        DraftKVLM(target="/nowhere", method="dense", **arguments)
    assert words in str(raised.value)


def test_model_arguments_as_lm_eval_passes_them(qwen_pair):
    # lm-eval's command line passes --batch_size (default 1) beside --model_args, which may name it too.
    model = DraftKVLM.create_from_arg_string("method=snapkv,budget=48,window=8,batch_size=4",
                                             {"batch_size": 1, "max_batch_size": None, "device": None,
                                              "pair": qwen_pair})
    assert model.batch_size == 4 and model.method.name == "snapkv"
    model = DraftKVLM.create_from_arg_string("method=dense,max_length=100", {"batch_size": "auto:4",
                                                                             "pair": qwen_pair})
    assert (model.batch_size, model.max_length) == (1, 100)
    with pytest.raises(ConfigError, match="max_length=9000 is more than the target's context of 4096"):
        DraftKVLM(pair=qwen_pair, max_length=9000)
    with pytest.raises(ConfigError, match="max_gen_toks=100 leaves no room"):
        DraftKVLM(pair=qwen_pair, max_length=100).generate_until(
            requests("generate_until", [("alpha bravo", {"until": ["."], "max_gen_toks": 100})]))


def test_the_lm_eval_command_takes_batch_size_in_model_args_and_names_bad_ones(qwen_pair, offline, tmp_path):
    qwen_pair.target.model.save_pretrained(tmp_path / "target")
    qwen_pair.tokenizer.save_pretrained(tmp_path / "target")
    base = ["lm-eval", "--model", "draftkv", "--tasks", "draftkv_tiny_gen", "--include_path", "tests/lm_eval_tasks",
            "--limit", "2"]
    result = CliRunner().invoke(app, [*base, "--model_args", f"pretrained={tmp_path / 'target'},method=dense,"
                                                             "batch_size=2", "--output_path", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for bad, words in (("batch_size=0", "batch_size must be a whole number >= 1"),
                       ("max_length=big", "max_length must be a whole number >= 2")):
        for handler in logging.getLogger("lm_eval").handlers:  # lm-eval's handler holds the last run's stderr
            if getattr(getattr(handler, "stream", None), "closed", False):
                handler.stream = sys.__stderr__
        result = CliRunner().invoke(app, [*base, "--model_args", f"pretrained={tmp_path / 'target'},{bad}"])
        assert result.exit_code == 2 and words in result.output, result.output
        assert "Traceback" not in result.output
