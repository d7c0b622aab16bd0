"""MkDocs hook: the results page lists every committed result folder from the folder's own README, so the
list is never retyped. Each folder's README is its page (docs/results links to the repository's results/)."""

from pathlib import Path

MARKER = "<!-- result folders -->"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER not in markdown:
        return markdown
    results = Path(config["docs_dir"]) / "results"
    items = []
    for readme in sorted(results.glob("*/README.md")):
        title = readme.read_text(encoding="utf-8").splitlines()[0].lstrip("# ").strip()
        items.append(f"- [`{readme.parent.name}`](results/{readme.parent.name}/README.md): {title}")
    return markdown.replace(MARKER, "\n".join(items))
