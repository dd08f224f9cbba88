"""The lint rules' catalogue and the data a lint returns: findings and a report that renders itself.

Shared by ``lint.py`` (rules over migration files) and ``lint_sql.py`` (rules over SQL), so that
both return the same ``Finding`` and the flow can put them in one artifact.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

#: "note": something worth knowing that judges nothing (a finding in an applied file)
Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class Rule:
    """One lint rule: a stable id, its usual severity, and a short title (docs/lint-rules.md)."""

    id: str
    severity: Severity
    title: str


RULES: dict[str, Rule] = {rule.id: rule for rule in (
    Rule("DM000", "error", "migration file cannot be read or parsed"),
    Rule("DM001", "error", "database.execute_sql in a migration"),
    Rule("DM002", "error", "add_column / drop_column (singular)"),
    Rule("DM003", "error", "table or column dropped without an explicit allow"),
    Rule("DM004", "error", "NOT NULL column added in one step without a default"),
    Rule("DM005", "warning", "rollback() missing or empty"),
    Rule("DM006", "error", "SQL built from values instead of parameters"),
    Rule("DM007", "error", "migration file name or number out of sequence"),
    Rule("DM008", "warning", "model class not defined in the migration"),
    Rule("DM009", "error", "migrator.sql placeholders that psycopg2 cannot fill"),
    Rule("DM010", "error", "a migration that commits or opens its own transaction"),
    Rule("DM011", "warning", "the application's own database object used in a migration"),
    Rule("DM012", "error", "a call peewee-migrate versions read differently"),
    Rule("DM013", "note", "migrator.backfill: this product's own operation (pw_migrate cannot run the file)"),
    Rule("DS100", "error", "SQL that PostgreSQL cannot parse"),
    Rule("DS101", "warning", "index built without CONCURRENTLY on an existing table"),
    Rule("DS102", "warning", "foreign key or check constraint added without NOT VALID"),
    Rule("DS103", "warning", "ALTER COLUMN TYPE (may rewrite the table)"),
    Rule("DS104", "warning", "SET NOT NULL without a validated CHECK first"),
    Rule("DS105", "warning", "table or column renamed"),
    Rule("DS106", "error", "CONCURRENTLY inside the migration transaction"),
    Rule("DS107", "error", "transaction control (BEGIN, COMMIT, ROLLBACK) in migration SQL"),
    Rule("DS108", "warning", "UPDATE of a whole existing table in the batch's transaction"),
)}


@dataclass(frozen=True)
class Finding:
    """One problem at one place: ``line`` is 1-based (for captured SQL, the statement's number)."""

    file: str
    line: int
    rule: str
    severity: Severity
    message: str

    def to_dict(self) -> dict:
        """Return the finding as a JSON-ready dict (file, line, rule, severity, message)."""
        return asdict(self)

    def text(self) -> str:
        """Return one terminal line: ``file:line: severity RULE message``."""
        return f"{self.file}:{self.line}: {self.severity} {self.rule} {self.message}"


def finding(rule: str, file: str, line: int, message: str, severity: Severity | None = None) -> Finding:
    """Return a Finding of ``rule`` with the rule's own severity unless one is given."""
    return Finding(file, line, rule, severity or RULES[rule].severity, message)


def sort_key(item: Finding) -> tuple:
    return (item.file, item.line, item.rule, item.message)


@dataclass(frozen=True)
class LintReport:
    """Every finding of one lint run, sorted by file and line, and the files that were read."""

    findings: tuple[Finding, ...]
    files: tuple[str, ...] = ()

    @classmethod
    def of(cls, findings: list[Finding], files: list[str] | tuple[str, ...] = ()) -> LintReport:
        """Return a report of ``findings`` in a stable order."""
        return cls(tuple(sorted(findings, key=sort_key)), tuple(files))

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def notes(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "note"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks the migrations: warnings alone are for the approver to read."""
        return not self.errors

    def summary(self) -> str:
        notes = f", {len(self.notes)} note(s) on applied files" if self.notes else ""
        return (f"{len(self.errors)} error(s), {len(self.warnings)} warning(s){notes} "
                f"in {len(self.files)} file(s)")

    def to_dict(self) -> dict:
        """Return the report as a JSON-ready dict."""
        return {
            "ok": self.ok,
            "errors": len(self.errors),
            "warnings": len(self.warnings),
            "files": list(self.files),
            "findings": [f.to_dict() for f in self.findings],
        }

    def text(self) -> str:
        """Return the terminal rendering: one line per finding, then the counts."""
        return "\n".join([f.text() for f in self.findings] + [self.summary()])

    def to_markdown(self) -> str:
        """Return a markdown section (a summary line and a table) for a Prefect artifact."""
        verdict = "passed" if self.ok else "**failed**"
        lines = [f"### Lint {verdict}: {self.summary()}", ""]
        if not self.findings:
            return "\n".join(lines + ["No findings."])
        lines += ["| severity | rule | where | message |", "|---|---|---|---|"]
        for f in self.findings:
            mark = f.severity
            lines.append(f"| {mark} | {f.rule} | `{f.file}:{f.line}` | {md_cell(f.message)} |")
        return "\n".join(lines)


def md_cell(text: str) -> str:
    # a pipe or a newline would end the table cell early
    return text.replace("|", "\\|").replace("\n", " ")
