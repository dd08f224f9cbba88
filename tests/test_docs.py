"""The docs a newcomer reads: a short README, links that lead somewhere, no note that is not in the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
#: the design notes the project was started from live outside the repository: a clone has none
NOTES = ("STYLE" + ".md", "DESIGN" + ".md", "FIELD" + "_NOTES")


def _markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_the_readme_is_an_entry_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 150
    assert any(line.startswith("## Layout") for line in lines[:40])  # the Layout near the top


def test_every_relative_link_of_the_docs_leads_to_a_file():
    broken = [f"{page.relative_to(ROOT)}: {target}" for page in _markdown_files()
              for target in LINK.findall(page.read_text())
              if "://" not in target and not (page.parent / target).exists()]
    assert not broken, "\n".join(broken)


def test_nothing_refers_to_a_note_that_is_not_in_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    texts = [name for name in tracked if name.endswith((".py", ".md", ".toml", ".yaml", "Makefile"))
             and (ROOT / name).is_file()]
    found = [name for name in texts
             if any(note in (ROOT / name).read_text(errors="replace") for note in NOTES)]
    assert not found, found
