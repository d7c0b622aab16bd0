"""The documentation: the MkDocs site builds strictly, every README link lands, and no result folder is
left out of the site."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build(project: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=project, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    built = build(ROOT, out)
    assert built.returncode == 0, built.stderr[-3000:]
    return out


def test_every_page_and_every_result_folder_is_built(site: Path) -> None:
    for page in ("quickstart", "methods", "families", "evaluation", "benchmark", "serving", "integrations",
                 "results", "reliability", "how-it-works", "development"):
        assert (site / page / "index.html").is_file(), page
    listing = (site / "results" / "index.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", listing)
    for readme in (ROOT / "results").glob("*/README.md"):
        name = readme.parent.name
        assert (site / "results" / name / "index.html").is_file(), name
        assert f'href="{name}/"' in listing, f"the results page does not list {name}"
        title = readme.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip().replace("`", "")
        assert html.escape(title, quote=False) in text, f"the results page does not show {name}'s title"


def test_a_broken_link_fails_the_build(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", project)
    shutil.copytree(ROOT / "docs", project / "docs", symlinks=True, ignore=shutil.ignore_patterns("results"))
    (project / "docs" / "results").symlink_to(ROOT / "results", target_is_directory=True)
    assert build(project, tmp_path / "ok").returncode == 0
    page = project / "docs" / "methods.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the missing page](no-such-page.md).\n", encoding="utf-8")
    broken = build(project, tmp_path / "broken")
    assert broken.returncode != 0
    assert "no-such-page.md" in broken.stderr


def test_the_readme_links_and_images_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert len(targets) >= 10
    for target in targets:
        if target.startswith("http"):
            continue
        assert (ROOT / target).exists(), target


def test_the_readme_starts_with_the_two_commands_that_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_heading = re.search(r"^## (.+)$", readme, re.MULTILINE).group(1)
    assert first_heading == "Two commands"
    commands = re.findall(r"```bash\n(.+?)\n```", readme)[:2]
    assert "draftkv generate" in commands[0] and commands[1].endswith("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "python -m pytest -q" in ci
    extras = re.search(r'pip install -e "\.\[([^\]]+)\]"', commands[1]).group(1)
    assert f'pip install -q -e ".[{extras}]"' in ci
