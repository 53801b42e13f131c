"""The documentation: README.md is a front page, docs/ holds one page per command or topic.

Every registered command has a docs page linked from the README's commands table, every relative link
(and #anchor) in README.md and docs/*.md resolves, and the README stays small. No TensorFlow here.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import typer.main

from cvtool.cli import app

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
README_MAX_BYTES = 8 * 1024
LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a shell comment in a bash block is no heading, no link)."""
    lines, fence = [], None
    for line in text.splitlines():
        stripped = line.lstrip()
        marker = stripped[:3]
        if fence is None and marker in ("```", "~~~"):
            fence = marker
        elif fence is not None and stripped.startswith(fence):
            fence = None
        elif fence is None:
            lines.append(line)
    return lines


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lower case, punctuation removed, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors, seen = set(), {}
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if m:
            slug = _slug(m.group(2))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _links(path: Path) -> list[str]:
    return [t for line in _prose_lines(path.read_text(encoding="utf-8")) for t in LINK.findall(line)]


def _commands_table() -> dict[str, str]:
    """command name -> the link target of its row in the README's commands table."""
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Commands")
    rows = {}
    for line in lines[start + 1 :]:
        if line.startswith("## "):
            break
        if not line.startswith("|"):
            continue
        first_cell = re.split(r"(?<!\\)\|", line)[1]
        name = re.search(r"cvtool ([a-z][a-z0-9-]*)", first_cell)
        target = LINK.search(first_cell)
        if name:
            rows[name.group(1)] = target.group(1) if target else ""
    return rows


def _registered_commands() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(name for name, cmd in group.commands.items() if not getattr(cmd, "hidden", False))


def test_every_command_has_a_docs_page_linked_from_the_readme_commands_table():
    table = _commands_table()
    commands = _registered_commands()
    assert commands, "no commands registered?"
    missing = [c for c in commands if c not in table]
    assert not missing, f"commands missing from README's commands table: {missing}"
    unlinked = [c for c in commands if not table[c].startswith("docs/")]
    assert not unlinked, f"commands whose table row links no docs/ page: {unlinked}"
    for command in commands:
        page = REPO / table[command].split("#")[0]
        assert page.is_file(), f"{command}: {table[command]} does not exist"
        assert f"cvtool {command}" in page.read_text(encoding="utf-8"), f"{page.name} never shows `cvtool {command}`"


def test_readme_commands_table_lists_only_registered_commands():
    stale = sorted(set(_commands_table()) - set(_registered_commands()))
    assert not stale, f"README lists commands the CLI does not have: {stale}"


def test_every_relative_link_in_readme_and_docs_resolves():
    broken = []
    for page in _pages():
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if not dest.exists():
                broken.append(f"{page.relative_to(REPO)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(REPO / t.split("#")[0]).resolve() for t in _links(README) if t.startswith("docs/")}
    orphans = [p.name for p in sorted(DOCS.glob("*.md")) if p.resolve() not in linked]
    assert not orphans, f"docs pages the README does not link: {orphans}"


def test_readme_stays_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes (bound {README_MAX_BYTES}): put reference text in the docs/ page it belongs to"
    )


def test_heading_anchors_follow_github():
    assert _slug("Training recipes (train and finetune)") == "training-recipes-train-and-finetune"
    assert _slug("Ready-made ImageNet classifiers: `imagenet:NAME`") == "ready-made-imagenet-classifiers-imagenetname"
