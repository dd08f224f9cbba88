"""Safety lint over migration files: the guide's rules, read from the Python AST.

A migration file is never imported or run here: a file that does not parse is a finding of its
own (DM000), never a crash. The rules on the file's code are in ``lint_ast``; the SQL it hands
to ``migrator.sql`` is checked by ``lint_sql``. This module reads files and folders, checks their
names and numbers, and applies the inline ``# dbmigrate: allow DMxxx`` markers.
Rule ids, severities and the safe recipes are documented in docs/lint-rules.md.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from dbcore.lint.ast_rules import ModuleLint
from dbcore.lint.report import RULES, Finding, LintReport, finding, sort_key
from dbcore.lint.sql_rules import lint_sql
from dbcore.migrate.files import FILE_RE

__all__ = ["RULES", "Finding", "LintReport", "lint_file", "lint_paths", "lint_pending",
           "lint_source", "lint_sql", "check_names", "apply_allow_markers", "declares_allow_destructive"]


_LEADING_NUMBER = re.compile(r"^(\d+)[_-]?(.*?)(\.py)?$")
#: a line's own allow: `# dbmigrate: allow DS104` (several ids: separated by commas or spaces)
_ALLOW_MARKER = re.compile(r"#\s*dbmigrate:\s*allow\s+((?:[A-Z]{2}\d{3}[\s,]*)+)")
# rules about the file as a whole, which a line's marker cannot allow
_FILE_RULES = {"DM000", "DM005", "DM007"}


def lint_paths(paths: Iterable[Path], *, allow_destructive: bool = False,
               applied: Iterable[str] = ()) -> LintReport:
    """Return the report over migration files and folders (a folder means its ``*.py`` files).

    Files named in ``applied`` (stems, as ``migratehistory`` records them) are history: what
    they do ran long ago and renaming one would make peewee-migrate run it again, so their
    findings are notes, never errors or warnings. Rules that stop a deploy judge pending files.
    """
    files = _files_of(paths)
    applied = set(applied)
    findings: list[Finding] = []
    for path in files:
        findings += lint_file(path, allow_destructive=allow_destructive)
    findings += check_names(files)
    return LintReport.of([as_history(f) if Path(f.file).stem in applied else f for f in findings],
                         [str(p) for p in files])


def as_history(item: Finding) -> Finding:
    """Return ``item`` as a note on an applied file."""
    return finding(item.rule, item.file, item.line, f"(applied) {item.message}", "note")


def lint_pending(migrations_dir: Path, pending: Iterable[Path], *,
                 allow_destructive: bool = False, applied: Iterable[str] | None = None) -> LintReport:
    """Return the lint of the migrations about to run.

    Migrations applied long ago are history, not something to stop a deploy for, and renaming
    one would make peewee-migrate run it again: only the pending files are judged, their numbers
    against the highest number already in the folder (or, given ``applied``, the highest applied:
    a plan that stops early, ``--target``, leaves later files pending, not applied).
    """
    pending = [Path(p) for p in pending]
    findings: list[Finding] = []
    for path in pending:
        findings += lint_file(path, allow_destructive=allow_destructive)
    findings += _pending_numbers(Path(migrations_dir), pending, applied)
    return LintReport.of(findings, [str(p) for p in pending])


def lint_file(path: Path, *, allow_destructive: bool = False) -> list[Finding]:
    """Return the findings of one migration file (its name and its content)."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [finding("DM000", str(path), 1, f"cannot read the file ({exc}): fix or remove it")]
    if not FILE_RE.match(path.name) and not re.search(r"^def migrate\(", source, re.MULTILINE):
        return []  # not a migration (peewee-migrate's conf.py, a helper module): nothing to judge
    return _name_findings(path) + lint_source(source, str(path), allow_destructive=allow_destructive)


def lint_source(source: str, filename: str, *, allow_destructive: bool = False) -> list[Finding]:
    """Return the findings of a migration's source text (name rules aside)."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        return [finding("DM000", filename, exc.lineno or 1,
                        f"syntax error: {exc.msg}: fix it; peewee-migrate would fail on it only "
                        "after running the migrations before it")]
    except (ValueError, RecursionError, MemoryError) as exc:
        return [finding("DM000", filename, 1, f"cannot parse the file ({type(exc).__name__}: "
                        f"{str(exc)[:80] or 'too deeply nested'}): fix or simplify it")]
    try:
        findings = ModuleLint(tree, filename, allow_destructive).run()
    except RecursionError:
        return [finding("DM000", filename, 1, "the file is nested too deeply for the lint to read "
                        "it: simplify the expressions")]
    return sorted(apply_allow_markers(findings, source), key=sort_key)


def declares_allow_destructive(source: str) -> bool:
    """Return True when a migration's source sets ``allow_destructive = True`` at the top level."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False
    return any(isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
               and node.value.value is True
               and any(isinstance(t, ast.Name) and t.id == "allow_destructive" for t in node.targets)
               for node in tree.body)


def allow_markers(source: str) -> dict[int, set[str]]:
    """Return {line: rule ids} of the ``# dbmigrate: allow RULE`` markers of a file's source.

    A marker alone on its line allows the line below it too. The rehearsal's lock budget (DL001,
    dbcore/deploy/verdict.py) reads its allows here as well.
    """
    allowed: dict[int, set[str]] = defaultdict(set)
    for number, text in enumerate(source.splitlines(), start=1):
        match = _ALLOW_MARKER.search(text)
        if match:
            rules = set(re.findall(r"[A-Z]{2}\d{3}", match.group(1)))
            allowed[number] |= rules
            if text.lstrip().startswith("#"):  # a comment line allows the statement below it
                allowed[number + 1] |= rules
    return allowed


def apply_allow_markers(findings: list[Finding], source: str) -> list[Finding]:
    """Drop what a line allows with ``# dbmigrate: allow RULE`` (on it or on the line above).

    A drop (DM003) stays listed, as a warning, so that the approver still sees it. The static
    lint and the rehearsal's lint of the captured SQL (whose findings carry the line of the
    migrator call that queued each statement) both judge allows here.
    """
    allowed = allow_markers(source)
    kept = []
    for item in findings:
        if item.rule in _FILE_RULES or item.rule not in allowed.get(item.line, ()):
            kept.append(item)
        elif item.rule == "DM003":
            kept.append(finding("DM003", item.file, item.line,
                                item.message.split(":")[0] + " (allowed explicitly on this line)",
                                "warning"))
    return kept


def _files_of(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.glob("*.py") if not p.name.startswith("__"))
        else:
            files.append(path)
    return files


def _numbered(folder: Path) -> dict[int, list[Path]]:
    numbered: dict[int, list[Path]] = defaultdict(list)
    for sibling in folder.glob("*.py"):
        match = FILE_RE.match(sibling.name)
        if match:
            numbered[int(match.group(1))].append(sibling)
    return numbered


def _duplicate(path: Path, number: int, numbered: dict[int, list[Path]], next_free: int) -> Finding:
    others = ", ".join(p.name for p in sorted(numbered[number]) if p != path)
    return finding("DM007", str(path), 1, f"number {number:03d} is also used by {others}: "
                   f"renumber the newer one {next_free:03d}")


def check_names(files: Iterable[Path]) -> list[Finding]:
    """Return DM007 findings for duplicate numbers and gaps among the files' folders' migrations."""
    files = [Path(p) for p in files]
    wanted = {p.resolve() for p in files}
    findings: list[Finding] = []
    for folder in sorted({p.parent for p in files}):
        numbered = _numbered(folder)
        expected = 1
        for number in sorted(numbered):
            for path in sorted(numbered[number]):
                if path.resolve() not in wanted:
                    continue
                if len(numbered[number]) > 1:
                    findings.append(_duplicate(path, number, numbered, max(numbered) + 1))
                if number != expected:
                    findings.append(finding("DM007", str(path), 1,
                                            f"number {number:03d} is out of sequence (expected "
                                            f"{expected:03d}): migrations run in name order; "
                                            f"rename it {expected:03d}_..."))
            expected = number + 1
    return findings


def _pending_numbers(folder: Path, pending: list[Path], applied_names: Iterable[str] | None = None
                     ) -> list[Finding]:
    """Return DM007 for pending files: duplicates, and numbers not following the highest applied."""
    numbered = _numbered(folder)
    waiting = {p.resolve() for p in pending}
    if applied_names is not None:
        done = set(applied_names)
        applied = [n for n, paths in numbered.items() if any(p.stem in done for p in paths)]
    else:
        applied = [n for n, paths in numbered.items() if any(p.resolve() not in waiting for p in paths)]
    expected = max(applied, default=0) + 1
    findings: list[Finding] = []
    for path in sorted(pending, key=lambda p: p.name):
        findings += _name_findings(path)
        match = FILE_RE.match(path.name)
        if not match:
            continue
        number = int(match.group(1))
        if len(numbered.get(number, ())) > 1:
            findings.append(_duplicate(path, number, numbered, max(numbered) + 1))
            expected = max(expected, number + 1)  # the second of a pair is not out of order too
            continue
        if number != expected:
            why = (f"at or below {expected - 1:03d}, the highest applied, so it runs out of order"
                   if number < expected else f"leaving a gap after {expected - 1:03d}")
            findings.append(finding("DM007", str(path), 1,
                                    f"pending migration number {number:03d} is {why}: rename it "
                                    f"{expected:03d}_... before it is applied"))
        expected = max(expected, number) + 1
    return findings


def _name_findings(path: Path) -> list[Finding]:
    if FILE_RE.match(path.name):
        return []
    match = _LEADING_NUMBER.match(path.name)
    if match and match.group(2):
        words = re.sub(r"\W+", "_", match.group(2)).strip("_").lower()
        better = f"{int(match.group(1)) % 1000:03d}_{words}.py"
    else:
        better = "NNN_what_it_does.py"
    return [finding("DM007", str(path), 1,
                    f"file name {path.name!r} is not NNN_name.py, so peewee-migrate does not run "
                    f"it as expected: rename it (e.g. {better})")]
