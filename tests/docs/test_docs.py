"""README.md and docs/*.md: every relative link resolves, README.md stays a front page, and every code
block that claims to run is run.

The rule for fenced code blocks (every fence names its language):

- ```python blocks are executed here, each in a fresh Python process, in an empty temporary working
  directory, unless the HTML comment on the last non-blank line before the block is
  ``<!-- not run: REASON -->`` (a sketch with placeholders, a GPU, a download, minutes of CPU; the
  reason must be given, at least three words) or ``<!-- recipe -->`` / ``<!-- recipe: NAME -->``
  (executed and checked by tests/docs/test_readme_recipe.py, which must name that marker and the page).
- ```bash / ```sh / ```shell blocks are run here with ``bash -euo pipefail`` from the repository
  root (``.venv/bin/`` standing for the running interpreter's directory), unless marked
  ``<!-- not run: REASON -->`` as above; only cheap commands (``wrpo ... --help``) are left unmarked.
- Blocks in any other language (```text, ```yaml, ```json, ...) are not code that runs.

A block is run, or marked with its reason, or the test fails: nothing is skipped. Links: every
``[text](target)`` (images too) whose target is not a URL must name a file or folder in the
repository, and a ``#anchor`` must be a heading of the target page (GitHub's slugs).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNS = {"python": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
MARKER = re.compile(r"^<!--\s*(not run|recipe)\b:?(.*?)-->$")
FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)")
LINK = re.compile(r"!?\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
MAX_README_LINES = 300
# what a user of the package cannot open (spelled in pieces so that this file cites neither)
FOREIGN = ("../" + "shared", "DES" + "IGN")


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("not run", reason) or ("recipe", name)

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def parse(text: str, page: Path) -> tuple[list[Block], list[str]]:
    """(fenced blocks, the lines outside them)."""
    blocks, prose, lines = [], [], text.split("\n")
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            prose.append(lines[i])
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        assert j < len(lines), f"{page}:{i + 1}: the code block is never closed"
        before = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        mm = MARKER.match(before)
        marker = (mm.group(1), mm.group(2).strip()) if mm else None
        code = textwrap.dedent("\n".join(lines[i + 1 : j])) + "\n"
        blocks.append(Block(page, i + 1, lang.lower(), code, marker))
        prose.append("")
        i = j + 1
    return blocks, prose


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: link text kept, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    _, prose = parse(page.read_text(), page)
    seen: dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if m:
            s = slug(m.group(1))
            n = seen.get(s, 0)
            seen[s] = n + 1
            out.add(s if n == 0 else f"{s}-{n}")
    return out


def link_problems(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links of ``page`` that name no file or folder of ``root``, or no heading there."""
    _, prose = parse(page.read_text(), page)
    text = re.sub(r"`[^`]*`", "", "\n".join(prose))  # inline code is not a link
    problems = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if root.resolve() not in (dest, *dest.parents):
            problems.append(f"{target}: outside the repository")
        elif not dest.exists():
            problems.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{target}: no heading #{anchor} in {dest.name}")
    return problems


def marker_problems(block: Block) -> list[str]:
    kind, arg = block.marker or (None, "")
    if block.lang not in RUNS and kind:
        return [f"{block.name}: a ```{block.lang} block is never run; drop its marker"]
    if kind == "not run" and len(arg.split()) < 3:
        return [f"{block.name}: <!-- not run: REASON --> needs its reason (three words at least)"]
    if kind == "recipe":
        if block.lang != "python":
            return [f"{block.name}: a recipe is a ```python block"]
        recipe_test = (ROOT / "tests" / "docs" / "test_readme_recipe.py").read_text()
        marker = f"<!-- recipe{': ' + arg if arg else ''} -->"
        page = str(block.page.relative_to(ROOT))
        if marker not in recipe_test or page not in recipe_test:
            return [f"{block.name}: tests/docs/test_readme_recipe.py does not run {marker} of {page}"]
    return []


ALL_BLOCKS = [b for page in PAGES for b in parse(page.read_text(), page)[0]]
TO_RUN = [b for b in ALL_BLOCKS if b.lang in RUNS and b.marker is None]


def test_the_pages_exist_and_the_readme_is_a_front_page():
    assert (ROOT / "docs" / "api.md") in PAGES and len(PAGES) >= 8
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, more than {MAX_README_LINES}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    assert link_problems(page) == []


def test_every_docs_page_is_linked_from_the_readme():
    _, prose = parse((ROOT / "README.md").read_text(), ROOT / "README.md")
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in LINK.findall("\n".join(prose))}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_the_architecture_page_names_files_that_exist():
    """docs/architecture.md draws the code's layers and data path: every file or folder it names exists."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`((?:wrpo|wrpo_kernels|tests|benchmarks|examples|csrc)/[\w/.]*)`", text))
    assert len(named) > 30 and [p for p in sorted(named) if not (ROOT / p).exists()] == []


def test_the_pages_stand_alone():
    """No pointers outside the repository: sibling checkouts, design notes, issue numbers."""
    for page in PAGES:
        text = page.read_text()
        assert not any(foreign in text for foreign in FOREIGN), page.name
        assert not re.search(r"(?<![\w/.#-])#\d+\b", text), page.name


def test_every_code_block_is_run_or_says_why_not():
    assert [b.name for b in ALL_BLOCKS if not b.lang] == [], "every code fence names its language"
    assert [p for b in ALL_BLOCKS for p in marker_problems(b)] == []
    assert {b.lang for b in TO_RUN} == {"python", "bash"}, "the pages have runnable blocks of both kinds"


def run_block(cmd: list[str], block: Block, cwd: Path) -> None:
    run = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{block.name}:\n{block.code}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.lang == "python"], ids=lambda b: b.name)
def test_python_block_runs(block, tmp_path):
    """In a process of its own (a fresh namespace, and no seed or setting left to later tests)."""
    script = tmp_path / "block.py"
    script.write_text(f"# {block.name}\n{block.code}")
    run_block([sys.executable, str(script)], block, cwd=tmp_path)


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.lang != "python"], ids=lambda b: b.name)
def test_shell_block_runs(block):
    code = block.code.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    run_block(["bash", "-euo", "pipefail", "-c", code], block, cwd=ROOT)


# The checks above must be able to fail: each on a page made to break it.


def test_the_link_check_finds_a_missing_file_a_missing_heading_and_a_way_out(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## 7. A `code` heading (with, punctuation)\n")
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n[ok](other.md#7-a-code-heading-with-punctuation) [ok](#page) [web](https://x.org)\n"
        "[gone](missing.md) [bad](other.md#nope) [up](../elsewhere.md) `[code](not-a-link.md)`\n"
        "```python\n[x](inside-a-block.md)\n```\n"
    )
    assert link_problems(page, root=tmp_path) == [
        "missing.md: no such file",
        "other.md#nope: no heading #nope in other.md",
        "../elsewhere.md: outside the repository",
    ]


def test_the_block_rule_refuses_a_marker_without_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "<!-- not run: -->\n```bash\nwrpo train\n```\n\n"
        "<!-- not run: needs a GPU here -->\n```python\nx\n```\n"
        "```python\nprint(1)\n```\n"
    )
    blocks, _ = parse(page.read_text(), page)
    assert [(b.line, b.lang, b.marker) for b in blocks] == [
        (2, "bash", ("not run", "")),
        (7, "python", ("not run", "needs a GPU here")),
        (10, "python", None),
    ]
    blocks = [Block(ROOT / "docs" / "x.md", b.line, b.lang, b.code, b.marker) for b in blocks]
    assert [len(marker_problems(b)) for b in blocks] == [1, 0, 0]
    recipe = Block(ROOT / "docs" / "x.md", 1, "python", "", ("recipe", "nowhere"))
    assert marker_problems(recipe) == [
        "docs/x.md:1: tests/docs/test_readme_recipe.py does not run <!-- recipe: nowhere --> of docs/x.md"
    ]
