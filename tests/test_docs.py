"""The README stays a ten-minute read and the documentation site stays whole: ``mkdocs build --strict`` fails
on a broken link, a missing anchor or a page left out of the nav (mkdocs.yml's ``validation``), and the README,
which MkDocs does not see, is checked here the same way."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 300

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default ``slugify``), from the heading's
    text as rendered: inline code and emphasis markers and link targets do not reach the anchor."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = text.replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def headings(page: Path) -> set[str]:
    # Lines inside code fences are shell comments and the like, not headings.
    anchors, fenced = set(), False
    for line in page.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := HEADING.match(line)):
            anchors.add(slug(m[1]))
    return anchors


def relative_links(page: Path) -> list[str]:
    text = page.read_text()
    # Code spans and fenced blocks may show link syntax without being links.
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"(https?:|mailto:|#)", t)]


def test_slug_matches_python_markdown() -> None:
    assert slug("Modern open-weight models: Llama 3.2, Qwen3, Gemma 3, SmolLM2") == (
        "modern-open-weight-models-llama-32-qwen3-gemma-3-smollm2"
    )
    assert slug("Chatting with your models: `gptlab serve`") == "chatting-with-your-models-gptlab-serve"
    assert slug("The library (`gptlab/`)") == "the-library-gptlab"


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, (
        f"README.md has {lines} lines (at most {MAX_README_LINES}): move detail to docs/"
    )


def test_readme_links_resolve() -> None:
    links = relative_links(README)
    assert links, "README.md links to no docs page"
    broken = []
    for link in links:
        path, _, anchor = link.partition("#")
        target = (README.parent / path).resolve()
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(REPO)}")
        elif anchor and target.suffix == ".md" and anchor not in headings(target):
            broken.append(f"{link}: no heading with anchor #{anchor} in {path}")
    assert not broken, "broken links in README.md:\n" + "\n".join(broken)


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    # The site goes to tmp_path: a test never writes into the working tree. The env var only silences
    # mkdocs-material's banner, so that a failure's message is the build's own warnings.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(REPO / "mkdocs.yml"),
            "--site-dir",
            str(tmp_path / "site"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").is_file()
