"""The README is a front page and the docs hold the topics: every relative link in them resolves, and the layout
map in CONTRIBUTING names every module of the package, each name real."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import REPO

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MAX_README_BYTES = 15_000


def _pages() -> list[Path]:
    return [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for the page's headings."""
    out = set()
    for line in page.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


def test_every_relative_link_in_the_readme_and_docs_resolves() -> None:
    broken = []
    for page in _pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target):
                continue  # an absolute URL
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.relative_to(REPO)}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert broken == []


def test_the_readme_is_a_front_page_that_links_every_topic_page() -> None:
    readme = REPO / "README.md"
    assert readme.stat().st_size <= MAX_README_BYTES
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in LINK.findall(readme.read_text())}
    topics = {p.resolve() for p in (REPO / "docs").glob("*.md")}
    assert topics - linked == set(), "a topic page the README does not link"
    text = readme.read_text()
    assert "bash scripts/setup.sh && .venv/bin/expertserve serve" in text and "bash scripts/test.sh" in text


def _layout_rows() -> dict[str, list[str]]:
    """Folder -> the module names its row of CONTRIBUTING's layout map names."""
    section = (REPO / "CONTRIBUTING.md").read_text().split("## Layout", 1)[1]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0].startswith("`expertserve"):
            rows[cells[0].strip("`")] = re.findall(r"`([\w]+\.py)`", cells[1])
    return rows


def test_the_layout_map_names_every_module_and_only_real_ones() -> None:
    rows = _layout_rows()
    named = {str(Path(folder) / name) for folder, names in rows.items() for name in names}
    missing_files = sorted(n for n in named if not (REPO / n).is_file())
    modules = {
        str(p.relative_to(REPO))
        for p in (REPO / "expertserve").rglob("*.py")
        if p.name != "__init__.py" and "__pycache__" not in p.parts
    }
    unmapped = sorted(modules - named)
    assert missing_files == [] and unmapped == []
