"""`draftkv inspect`: every method's view of one prompt, the page it writes, and that page rendered by a
real browser (headless Chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import tiny_pair
from tiny import long_context
from typer.testing import CliRunner

import draftkv
from draftkv.cli import app
from draftkv.eval import runner as eval_runner

KV_BUDGET, PROMPT_BUDGET, NEW_TOKENS = 48, 120, 6
QUESTION = "what is the magic number?"


def every_method() -> list:
    settings = []
    for name in draftkv.METHODS:
        takes_kv, takes_prompt = draftkv.methods.budget_kinds(name)
        settings.append(eval_runner.Setting(name, KV_BUDGET if takes_kv else None,
                                            PROMPT_BUDGET if takes_prompt else None).make())
    return settings


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def inspected(request):
    pair = tiny_pair(request.param)
    context = long_context(300, seed=5)
    methods = every_method()
    return pair, context, methods, draftkv.inspect(pair, context, QUESTION, methods, max_new_tokens=NEW_TOKENS)


def test_each_view_is_what_the_method_did_alone(inspected):
    """One pass for all methods, and each view's answer, kept tokens and entries equal the method's own run."""
    pair, context, methods, inspection = inspected
    n = len(inspection.tokens)
    assert n == draftkv.generate(pair, context, QUESTION, method="dense", max_new_tokens=1).stats.prompt_tokens
    assert QUESTION in "".join(inspection.tokens)
    for method, view in zip(methods, inspection.views, strict=True):
        alone = draftkv.generate(pair, context, QUESTION, method=method, max_new_tokens=NEW_TOKENS)
        assert view.answer == alone.text, view.label
        assert view.stats["kv_entries"] == alone.stats.kv_entries
        assert len(view.kept_share) == n and all(0 <= s <= 1 for s in view.kept_share)
        if alone.kept_positions is not None:  # the share of layers and heads that kept each token
            slots = sum(layer.shape[0] for layer in alone.kept_positions)
            total = sum(int((layer >= 0).sum()) for layer in alone.kept_positions)
            assert sum(view.kept_share) == pytest.approx(total / slots, abs=1e-2)
            assert view.kept_unit.startswith("KV entries")
        elif alone.kept_tokens is not None:
            assert [i for i, s in enumerate(view.kept_share) if s] == alone.kept_tokens.tolist()
            assert view.kept == alone.stats.kept_prompt_tokens
        else:
            assert view.kept_share == [1.0] * n
        if view.importance is not None:
            assert len(view.importance) == n and max(view.importance) == pytest.approx(1.0, abs=1e-3)
            assert min(view.importance) >= 0
        assert view.guess == alone.guess


def test_scorers_importance_points_where_the_method_kept(inspected):
    """A KV method keeps the entries its scorer rates highest (after a small pooling): kept tokens score
    higher on average than dropped ones. (Prompt methods smooth their scores and keep whole neighbourhoods,
    so a single token's raw score says less of them.)"""
    _, _, methods, inspection = inspected
    checked = 0
    for method, view in zip(methods, inspection.views, strict=True):
        if view.importance is None or not method.compresses_kv or method.compresses_prompt or \
                method.name in ("pyramidkv", "ada-snapkv", "ada-speckv"):
            continue
        kept = [v for v, s in zip(view.importance, view.kept_share, strict=True) if s > 0.5]
        dropped = [v for v, s in zip(view.importance, view.kept_share, strict=True) if s == 0]
        if kept and dropped:
            assert sum(kept) / len(kept) > sum(dropped) / len(dropped), view.label
            checked += 1
    assert checked >= 5
    assert {m.name for m, v in zip(methods, inspection.views, strict=True) if v.importance is None} >= \
        {"streamingllm", "keep-last", "keep-ends"}


def test_the_page_is_self_contained(inspected, tmp_path):
    *_, inspection = inspected
    page = inspection.write(tmp_path / "page.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing from a network
    data = json.loads(re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert data["tokens"] == inspection.tokens and len(data["views"]) == len(draftkv.METHODS)


def test_the_command_line_writes_the_page(tmp_path, monkeypatch):
    pair = tiny_pair("qwen2")
    from draftkv.models import loading

    monkeypatch.setattr(loading, "load_pair", lambda *a, **k: pair)
    context = tmp_path / "context.txt"
    context.write_text(long_context(200, seed=2), encoding="utf-8")
    out = tmp_path / "pages" / "page.html"
    result = CliRunner().invoke(app, ["inspect", "--context-file", str(context), "-q", QUESTION, "--methods",
                                      "dense,snapkv@48,speckv@48,specpc@100", "--max-new-tokens", "4",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert [v["label"] for v in data["views"]] == ["dense", "snapkv (budget=48)", "speckv (budget=48)",
                                                   "specpc (budget=100)"]
    assert out.is_file() and "snapkv (budget=48)" in out.read_text(encoding="utf-8")


@pytest.mark.parametrize("args, words", [
    (["--methods", "nosuch@1"], "unknown method"),
    (["--methods", "snapkv@0"], "counts (whole numbers >= 1) or ratios"),
    (["--methods", ","], "--methods names nothing"),
    ([], "the prompt is empty"),
])
def test_bad_input_is_refused_before_a_model_loads(args, words, monkeypatch, tmp_path):
    from draftkv.models import loading

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before a check that needs none")

    monkeypatch.setattr(loading, "load_pair", refuse)
    result = CliRunner().invoke(app, ["inspect", "--out", str(tmp_path / "p.html"), *args], input="")
    assert result.exit_code == 2 and words in result.output, result.output


# ---- the page in a real browser ----

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


class Rendered(HTMLParser):
    """The DOM Chromium rendered: per panel, its method, its token spans' classes and shares, its texts."""

    def __init__(self) -> None:
        super().__init__()
        self.panels: list[dict] = []
        self.classes: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.classes.append(attrs.get("class") or "")
        if tag == "section" and "panel" in (attrs.get("class") or ""):
            self.panels.append({"method": attrs.get("data-method"), "tokens": [], "text": []})
        elif tag == "span" and (attrs.get("class") or "").startswith("t ") and self.panels:
            self.panels[-1]["tokens"].append((attrs["class"].split(), float(attrs["data-share"])))

    def handle_endtag(self, tag):
        if self.classes:
            self.classes.pop()

    def handle_data(self, data):
        if self.panels and self.classes and self.classes[-1] in ("answer", "guess", ""):
            self.panels[-1]["text"].append(data)


def render(page: Path, tmp_path: Path, screenshot: Path | None = None) -> Rendered:
    flags = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1600,1000", "--virtual-time-budget=5000"]
    if screenshot is not None:
        subprocess.run([*flags, f"--screenshot={screenshot}", page.as_uri()], check=True, capture_output=True,
                       timeout=120)
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    parsed = Rendered()
    parsed.feed(dom)
    parsed.dom = dom
    return parsed


@pytest.mark.skipif(BROWSER is None and not os.environ.get("DRAFTKV_REQUIRE_BROWSER"),
                    reason="no Chromium here (CI installs it and sets DRAFTKV_REQUIRE_BROWSER)")
def test_a_browser_renders_what_each_method_kept(inspected, tmp_path):
    assert BROWSER is not None, "DRAFTKV_REQUIRE_BROWSER is set but no Chromium was found"
    *_, inspection = inspected
    n = len(inspection.tokens)
    for left in range(len(inspection.views)):  # the page shows the first two; each view in turn goes first
        views = [inspection.views[left], inspection.views[(left + 1) % len(inspection.views)]]
        page = draftkv.Inspection(inspection.tokens, inspection.question_start, inspection.question, views)
        path = page.write(tmp_path / f"page{left}.html")
        rendered = render(path, tmp_path)
        assert [p["method"] for p in rendered.panels] == [v.label for v in views]
        for panel, view in zip(rendered.panels, views, strict=True):
            assert len(panel["tokens"]) == n  # every prompt token is shown
            kept = [share for classes, share in panel["tokens"] if "k" in classes]
            dropped = [share for classes, share in panel["tokens"] if "d" in classes]
            assert len(kept) + len(dropped) == n and all(share == 0 for share in dropped)
            if view.kept_unit.startswith("prompt"):
                assert len(kept) == view.kept  # the kept count the stats give
            else:
                assert sum(kept) == pytest.approx(view.stats["kv_entries"], abs=0.02 * view.stats["kv_entries"])
            shown = "".join(panel["text"])
            assert view.answer.strip() in shown
            if view.guess:
                assert view.guess.strip()[:20] in shown


PAYLOADS = ["<!--<script>", "</script><script>document.body.remove()</script>", "__DATA__", "a\u2028b\u2029c",
            "&lt;b&gt; & <b>", "]]></x>"]


@pytest.mark.skipif(BROWSER is None and not os.environ.get("DRAFTKV_REQUIRE_BROWSER"),
                    reason="no Chromium here (CI installs it and sets DRAFTKV_REQUIRE_BROWSER)")
@pytest.mark.parametrize("payload", PAYLOADS)
def test_no_text_can_break_the_page(inspected, tmp_path, payload):
    """The payload in the question, a prompt token (the context, the system prompt and the answer prefix are
    tokens of the prompt) and an answer: the page still shows its views, and the text as written."""
    import dataclasses
    import html

    *_, inspection = inspected
    tokens = [payload, *inspection.tokens[1:]]
    views = [dataclasses.replace(view, answer=f"{payload} {view.answer}") for view in inspection.views[:2]]
    page = draftkv.Inspection(tokens, inspection.question_start, f"{payload} {QUESTION}", views)
    rendered = render(page.write(tmp_path / "page.html"), tmp_path)
    assert [p["method"] for p in rendered.panels] == [v.label for v in views]
    assert all(len(panel["tokens"]) == len(tokens) for panel in rendered.panels)
    for panel, view in zip(rendered.panels, views, strict=True):
        assert view.answer.strip() in "".join(panel["text"])
    title = re.search(r"<title>(.*?)</title>", rendered.dom, re.S).group(1)
    assert html.unescape(title) == f"draftkv inspect: {payload} {QUESTION}"[:len("draftkv inspect: ") + 80]
    assert rendered.dom.count(html.escape(payload, quote=False)) >= 3  # a token, the question's title, answers


def test_inspect_needs_a_method_and_a_failed_write_leaves_no_page(inspected, tmp_path, monkeypatch):
    pair, context, _, inspection = inspected
    with pytest.raises(draftkv.ConfigError, match="at least one method"):
        draftkv.inspect(pair, context, QUESTION, [])
    (tmp_path / "page.html").write_text("the page of an earlier run")
    real = Path.write_text

    def full_disk(self, text, *args, **kwargs):
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        inspection.write(tmp_path / "page.html")
    monkeypatch.undo()
    assert (tmp_path / "page.html").read_text() == "the page of an earlier run"  # untouched, and no partial file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.html"]
