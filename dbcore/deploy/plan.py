"""The deploy plan: everything an approver judges, as data, as markdown and as terminal text.

It gathers the migrations to apply, the lint report, the backup and the rehearsal on a copy.
The flow publishes ``to_markdown()`` as a Prefect artifact; the CLI prints ``text()``. No URL with
a password ever goes in: the database is shown masked.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

from dbcore.backup.dump import BackupInfo
from dbcore.connection import Target
from dbcore.deploy.preflight import PreflightReport
from dbcore.deploy.rehearsal import RehearsalReport
from dbcore.deploy.verdict import LockVerdict, size_text
from dbcore.lint.engine import lint_pending
from dbcore.lint.report import Finding, LintReport, md_cell
from dbcore.migrate.history import ApprovalRecord
from dbcore.migrate.plan import Plan, plan_apply
from dbcore.migrate.sqlcheck import sql_digest
from dbcore.settings import Settings


def _statement(captured: str) -> str:
    """Return a captured statement for the artifact: parameter values are counted, not shown."""
    sql, _, params = captured.partition(" -- params: ")
    note = " -- with parameters (values not shown)" if params else ""
    return sql.rstrip(";") + ";" + note


def plan_and_lint(target: Target, settings: Settings, *, allow_destructive: bool = False,
                  upto: str | None = None) -> tuple[Plan, LintReport]:
    """Return the pending migrations (up to ``upto``) and the lint over the ones that will run.

    The one way the flow, the fleet and ``dbmigrate plan`` judge what is pending.
    """
    plan = plan_apply(target, settings, upto=upto)
    # numbers judged against the history: a plan that stops early leaves later files pending
    return plan, lint_pending(settings.migrations_dir, [m.path for m in plan.migrations],
                              allow_destructive=allow_destructive, applied=plan.applied_before)


def plan_fingerprint(plan: Plan, backup_key: str | None, sql: str | None = None) -> str:
    """Return 16 hex digits that change when the target, a migration (name or file), any file
    of the migrations folder (or of a checks folder beside it), the backup or the SQL the
    rehearsal sent (``sql``: :func:`dbcore.migrate.sqlcheck.sql_digest`) does.

    An approval covers the plan of one fingerprint: the flow re-makes the plan right before the
    apply and refuses to go on when the fingerprint differs from the approved one; the apply then
    compares the SQL it sends with the rehearsal's (dbcore.migrate.sqlcheck).
    """
    data: dict[str, object] = {"database": plan.database, "migrations": [[m.name, m.sha256] for m in plan.migrations],
            "backup": backup_key, "inputs": [list(i) for i in plan.inputs]}
    if sql is not None:
        data["sql"] = sql
    if plan.steps_pending:  # a run continuing an earlier apply's phases 2-4: its own approval
        data["steps"] = list(plan.steps_pending)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def plan_changes(before: Plan, after: Plan) -> str:
    """Return, in a few words, how ``after`` differs from ``before`` (migrations added, gone, edited)."""
    old, new = dict((m.name, m.sha256) for m in before.migrations), dict((m.name, m.sha256) for m in after.migrations)
    words = [f"{n}.py changed on disk" for n in new if n in old and new[n] != old[n]]
    words += [f"{n}.py is new" for n in new if n not in old]
    words += [f"{n}.py is no longer pending" for n in old if n not in new]
    migration_paths = {m.path.name for m in after.migrations} | {m.path.name for m in before.migrations}
    was, now = dict(before.inputs), dict(after.inputs)
    for path in sorted(set(was) | set(now)):
        if was.get(path) != now.get(path) and path.rsplit("/", 1)[-1] not in migration_paths:
            state = "is new" if path not in was else "is gone" if path not in now else "changed"
            words.append(f"{path} {state}")
    if before.database != after.database:
        words.append("the target database is another")
    return ", ".join(words) or "the backup is another"


def _copy_sentence(r: RehearsalReport, markdown: bool = True) -> str:
    """Return how and where the copy was made, e.g. "Restored the backup into `x` on ... in 1.2 s"."""
    name = f"`{r.scratch_database}`" if markdown else r.scratch_database
    where = f" on {r.server}" if r.server else ""
    if r.method == "template":
        return (f"Copied the database into {name}{where} with CREATE DATABASE ... TEMPLATE "
                f"(nobody else was connected) in {r.restore_seconds:.2f} s; the backup was not loaded "
                f"into it, but pg_restore read the stored bytes back whole, every entry (sha256 checked)")
    how = "from its own stream as it uploaded" if r.method == "stream" else "after it was stored"
    return (f"Restored the backup (the bytes stored, sha256 checked) into {name}{where}, {how}, "
            f"in {r.restore_seconds:.2f} s")


#: said in the plan when the rehearsal's copy was on the production cluster (MIGRATE_REHEARSAL_ON_TARGET=1)
ON_PRODUCTION_CLUSTER = (
    "the copy was made on the production cluster itself, under production's user "
    "(MIGRATE_REHEARSAL_ON_TARGET=1): the migration code of the rehearsal ran with production's "
    "credentials (pointed at the copy) and on production's server")


def _leftover_lines(r: RehearsalReport, markdown: bool = True) -> list[str]:
    """Return where the copy was, when that is production's cluster, and what the rehearsal found
    of earlier runs that died: dropped, or kept and why."""
    notes = [f"- **note**: {ON_PRODUCTION_CLUSTER}" if markdown else f"- note: {ON_PRODUCTION_CLUSTER}"
             ] if r.on_production_cluster else []
    tick = "`" if markdown else ""
    lines = [f"- dropped scratch database {tick}{name}{tick}, left by an earlier run that did "
             "not finish" for name in r.leftovers.dropped]
    lines += [f"- kept scratch database {tick}{name}{tick}: {why}" for name, why in r.leftovers.kept]
    lines = notes + lines
    return lines + [""] if lines and markdown else lines


def lock_lines(verdict: LockVerdict, enforced: bool, markdown: bool = True) -> list[str]:
    """Return the lock verdict: where it was measured, one line per table, then the budget's word."""
    lines = [verdict.headline() + ("." if markdown else ":")]
    if markdown:
        lines.append("")
    lines += [("- " if markdown else "  ") + line for line in verdict.lines()]
    if not verdict.tables:
        lines.append(("- " if markdown else "  ") + "no table of the application is locked")
    for b in verdict.breaches:
        if b.allowed_by:
            word = f"ALLOWED over the {b.budget:g} s budget by {b.allowed_by}"
        else:
            word = "STOPS THE RUN" if enforced else "WARNING (local: the budget only warns)"
        lines.append(("- " if markdown else "  ") + f"{'**' if markdown else ''}{word}"
                     f"{'**' if markdown else ''}: {b.text()}")
    return lines


@dataclass(frozen=True)
class DeployPlan:
    """What will happen to a database if the run is approved."""

    env: str
    plan: Plan
    lint: LintReport
    backup: BackupInfo | None = None
    rehearsal: RehearsalReport | None = None
    preflight: PreflightReport | None = None

    @property
    def new_sql_findings(self) -> list[Finding]:
        """Rehearsal SQL findings the static lint did not already report for that migration."""
        if not self.rehearsal:
            return []
        seen = {(Path(f.file).stem, f.line, f.rule, f.severity) for f in self.lint.findings}
        return [f for f in self.rehearsal.sql_findings
                if (Path(f.file).stem, f.line, f.rule, f.severity) not in seen]

    @property
    def ok(self) -> bool:
        """True when nothing found so far blocks the apply."""
        return self.lint.ok and (self.rehearsal is None or self.rehearsal.ok)

    def stops(self) -> list[str]:
        """Return one line for each thing that blocks the apply (empty when ``ok``)."""
        out = [f"lint: {f.text()}" for f in self.lint.errors]
        if self.rehearsal is not None:
            out += [f"rehearsal on a copy: {f.text()}" for f in self.rehearsal.sql_findings
                    if f.severity == "error"]
            if self.rehearsal.checks is not None and not self.rehearsal.checks.ok:
                problems = [line.strip() for line in self.rehearsal.checks.text().splitlines()
                            if line.strip() and line.strip() != "no invalid indexes"]
                out.append("post-checks on the copy failed: " + "; ".join(problems))
            if self.rehearsal.over_budget and self.rehearsal.locks is not None:
                out += [b.text() for b in self.rehearsal.locks.stopping]
        return out

    def stop_reason(self) -> str:
        """Return the one line a stopped run ends with: the first blocking finding, and how many more."""
        stops = self.stops()
        if not stops:
            return ""
        more = f" (and {len(stops) - 1} more)" if len(stops) > 1 else ""
        return f"{stops[0]}{more}; all of it in the migration-plan artifact"

    def record_allowances(self, approval: ApprovalRecord) -> ApprovalRecord:
        """Return ``approval`` with the lock budget breaches that were allowed added to its comment (the audit)."""
        r = self.rehearsal
        allowed = [b for b in (r.locks.breaches if r and r.locks else ()) if b.allowed_by]
        if not allowed:
            return approval
        note = "long locks allowed: " + ", ".join(
            f"{b.verdict.table} {b.verdict.seconds:.1f} s (by {b.allowed_by})" for b in allowed)
        return replace(approval, comment=f"{approval.comment}; {note}" if approval.comment else note)

    @property
    def sql_digest(self) -> str | None:
        """The digest of the SQL the rehearsal sent (None without a rehearsal)."""
        return sql_digest(self.rehearsal.results) if self.rehearsal else None

    @property
    def fingerprint(self) -> str:
        """The plan's fingerprint (:func:`plan_fingerprint`): what an approval covers."""
        return self.fingerprint_of(self.plan)

    def fingerprint_of(self, plan: Plan) -> str:
        """Return the fingerprint ``plan`` (made again, before the apply) would have with this backup and SQL."""
        return plan_fingerprint(plan, self.backup.key if self.backup else None, self.sql_digest)

    def target(self) -> str:
        """Where: the masked URL and the environment."""
        return f"{self.plan.database} ({self.env})"

    def headline(self) -> str:
        """One line: what would be applied where."""
        return f"{len(self.plan.migrations)} migration(s) to apply to {self.target()}"

    def summary(self) -> str:
        """The first line an approver reads, in markdown: how many, which database, the verdict, the fingerprint."""
        n = len(self.plan.migrations)
        verdict = "rehearsed on a copy: passed" if self.rehearsal and self.rehearsal.ok else (
            "rehearsal on a copy FAILED" if self.rehearsal else "not rehearsed on a copy")
        locks = self.rehearsal.locks if self.rehearsal else None
        if locks and locks.other_major:
            verdict += f" (on PostgreSQL {locks.rehearsal_major}, production runs {locks.target_major})"
        return (f"**Apply {n} migration(s) to `{self.plan.dbname}` ({self.env})**: {verdict}; "
                f"plan fingerprint `{self.fingerprint}`")

    def to_dict(self) -> dict:
        return {
            "env": self.env, "plan": self.plan.to_dict(), "lint": self.lint.to_dict(),
            "backup": self.backup.to_dict() if self.backup else None,
            "rehearsal": self.rehearsal.to_dict() if self.rehearsal else None, "ok": self.ok,
            "preflight": self.preflight.to_dict() if self.preflight else None,
            "fingerprint": self.fingerprint,
        }

    def to_markdown(self) -> str:
        """Return the plan as a markdown document (the approval artifact)."""
        # code spans, not bare text: the UI's markdown would turn a URL into a link
        backup = f"`{self.backup.key}`" if self.backup else "**none**"
        out = [self.summary(), ""]
        if self.rehearsal and self.rehearsal.locks:
            out += ["### What the live application will feel", ""]
            out += lock_lines(self.rehearsal.locks, self.rehearsal.budget_enforced) + [""]
        out += [f"- database: `{self.plan.database}`", f"- backup: {backup}", ""]
        if self.stops():
            out += ["### What stops this run", ""] + [f"- {md_cell(s)}" for s in self.stops()] + [""]
        out += ["### Migrations", ""]
        rehearsed = {r.name: r for r in self.rehearsal.results} if self.rehearsal else {}
        out += ["| # | migration | transaction | rehearsal time | sha256 |", "|---|---|---|---|---|"]
        for number, phase in enumerate(self.plan.phases, 1):
            for m in phase.migrations:
                took = f"{rehearsed[m.name].seconds:.2f} s" if m.name in rehearsed else "not rehearsed"
                kind = f"{number} (batch)" if phase.atomic else f"{number} (alone, atomic = False)"
                out.append(f"| {m.number} | `{m.name}` | {kind} | {took} | `{m.sha256[:12]}` |")
        out += ["", self.lint.to_markdown(), ""]
        out += _after_commit_lines(self)
        if self.preflight:
            out += [f"### Preflight {self.preflight.stage}", "",
                    md_cell(self.preflight.text().split(": ", 1)[-1]), "",
                    "It runs again right before the apply.", ""]
        if self.backup:
            b = self.backup
            out += ["### Backup", "", f"- key: `{b.key}` in bucket `{b.bucket}`",
                    f"- size: {size_text(b.size)} ({b.compression}), sha256 `{b.sha256}`",
                    f"- last applied migration: `{b.last_migration}`; {b.pg_dump_version}", ""]
        else:
            out += ["### Backup", "", "**No backup was taken.**", ""]
        if self.rehearsal:
            r = self.rehearsal
            verdict = "passed" if r.ok else "**failed**"
            out += [f"### Rehearsal on a copy {verdict}", "",
                    f"{_copy_sentence(r)}, applied in {r.apply_seconds:.2f} s, then dropped the "
                    "copy.", ""]
            out += _leftover_lines(r)
            if r.dropped_columns:
                out += ["#### Columns dropped (their values are lost)", ""]
                out += [f"- `{d.table}.{d.column}`: **{d.values}** non-null value(s) on the copy, "
                        f"dropped by `{d.migration}.py`" + (f" line {d.line}" if d.line else "")
                        for d in r.dropped_columns]
                out.append("")
            if self.new_sql_findings:
                out += ["| severity | rule | where | message |", "|---|---|---|---|"]
                out += [f"| {f.severity} | {f.rule} | `{f.file}:{f.line}` | {md_cell(f.message)} |"
                        for f in self.new_sql_findings]
                out.append("")
            if r.checks:
                out += [r.checks.to_markdown(), ""]
            for result in r.results:
                out += [f"<details><summary>SQL of {result.name}</summary>", "", "```sql"]
                out += [_statement(s) for s in result.sql] or ["-- no statements"]
                out += ["```", "</details>", ""]
        else:
            out += ["### Rehearsal", "", "Not rehearsed on a copy.", ""]
        return "\n".join(out)

    def text(self) -> str:
        """Return the plan for a terminal."""
        out = [self.headline(), f"plan fingerprint: {self.fingerprint}"]
        if self.rehearsal and self.rehearsal.locks:
            out += lock_lines(self.rehearsal.locks, self.rehearsal.budget_enforced, markdown=False)
        for phase in self.plan.phases:
            kind = "one transaction" if phase.atomic else "alone, atomic = False"
            out += [f"  {m.name}  ({kind})" for m in phase.migrations]
        out += ["  " + line for line in _after_commit_lines(self, markdown=False)]
        out.append("lint: " + self.lint.summary())
        out += [f"  {f.text()}" for f in self.lint.findings]
        if self.preflight:
            out.append(self.preflight.text())
        if self.backup:
            out.append(f"backup: {self.backup.key} ({size_text(self.backup.size)}, "
                       f"sha256 {self.backup.sha256[:16]}...)")
        if self.rehearsal:
            r = self.rehearsal
            copied = _copy_sentence(r, markdown=False)
            out.append(f"rehearsal on a copy: {'passed' if r.ok else 'FAILED'}; "
                       f"{copied[:1].lower()}{copied[1:]}, apply {r.apply_seconds:.2f}s")
            out += ["  " + line.removeprefix("- ") for line in _leftover_lines(r, markdown=False)]
            out += [f"  column dropped: {d.describe()}" for d in r.dropped_columns]
            out += [f"  {f.text()}" for f in self.new_sql_findings]
            if r.checks and not r.checks.ok:
                out.append(r.checks.text())
        out += [f"stops the run: {line}" for line in self.stops()]
        return "\n".join(out)


def _after_commit_lines(deploy: DeployPlan, *, markdown: bool = True) -> list[str]:
    """The phases after the batch's commit (safe forms, backfills): the SQL by phase, the copy's times."""
    out = []
    if deploy.plan.steps_pending:
        out.append("Continues the steps an earlier apply left (its batch is committed): "
                   + "; ".join(deploy.plan.steps_pending))
    r = deploy.rehearsal
    if r and r.steps:
        out.append("After the batch's commit (safe forms and backfills, rehearsed on the copy):")
        out += ["", "```sql", *r.steps, "```", ""] if markdown else list(r.steps)
        if r.phase_timings:
            out.append("Times on the copy: " + "; ".join(r.phase_timings))
    if markdown and out:
        return ["### After the batch's commit", "", *out, ""]
    return out
