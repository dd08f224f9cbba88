"""Rehearse a plan on a copy: copy the database into a scratch one, apply there, check, drop.

The rehearsal proves three things before anyone approves: the backup restores, the migrations
apply to the real data (with the SQL and timings captured), and the result passes the
post-checks. The live database is only read (by the backup). Where the copy is made is decided
in ``dbcore.deploy.scratch``: never on the production cluster unless asked. The copy is made
while the backup uploads, from its own stream (dbcore/backup/stream.py); locally on the target's
own cluster, with ``CREATE DATABASE ... TEMPLATE`` when nobody else is connected to the target.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import peewee
import psycopg2
from pydantic import SecretStr

from dbcore.backup.dump import BackupInfo, BytesProgress, backup_to_s3
from dbcore.backup.pgtools import server_major
from dbcore.backup.restore import restore_backup
from dbcore.backup.stream import ArchiveCheck, StreamRestore
from dbcore.checks.data import DataChecks
from dbcore.checks.post import CheckReport, drift_before, load_models, run_post_checks
from dbcore.connection import Env, Target, raw_session
from dbcore.deploy.dropped import DropCounter, DroppedColumn
from dbcore.deploy.locks import LockMeter
from dbcore.deploy.scratch import (
    Leftovers,
    RehearsalServer,
    claim,
    copy_with_template,
    create_database,
    drop_database,
    drop_leftovers,
    refuse_the_target_cluster,
    rehearsal_server,
    scratch_name,
)
from dbcore.deploy.verdict import LockVerdict, judge
from dbcore.errors import (
    BackupCorrupt,
    DbcoreError,
    RehearsalFailed,
    RehearsalMajorMismatch,
    RestoreFailed,
    RestoreRefused,
)
from dbcore.lint.engine import apply_allow_markers, declares_allow_destructive
from dbcore.lint.report import Finding, finding
from dbcore.lint.sql_rules import SqlBatch
from dbcore.migrate.backfill import LargeUpdates
from dbcore.migrate.files import review_env
from dbcore.migrate.isolated import call_with_plan
from dbcore.migrate.observe import RunObserver
from dbcore.migrate.plan import MigrationResult, Plan, Progress
from dbcore.migrate.runner import execute
from dbcore.redact import error_line, redact
from dbcore.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RehearsalReport:
    """What the rehearsal on a copy showed."""

    scratch_database: str
    backup_key: str
    restore_seconds: float
    results: tuple[MigrationResult, ...]
    checks: CheckReport | None
    sql_findings: tuple[Finding, ...] = field(default=())
    server: str = ""  # where the copy was made, and why there
    method: str = "restore"  # "restore" of the backup, or "template" (CREATE DATABASE ... TEMPLATE)
    leftovers: Leftovers = field(default_factory=Leftovers)
    #: the columns the plan drops, with the non-null values each held on the copy
    dropped_columns: tuple[DroppedColumn, ...] = ()
    #: the copy was made on a live target's own cluster, under its user (MIGRATE_REHEARSAL_ON_TARGET=1)
    on_production_cluster: bool = False
    #: the work the safe forms and backfills moved after the batch's commit, SQL by phase
    steps: tuple[str, ...] = field(default=())
    #: how long each of those steps took on the copy (a backfill's time: the ETA live)
    phase_timings: tuple[str, ...] = field(default=())
    locks: LockVerdict | None = None  # what each table's lock will do to the live application
    budget_enforced: bool = False  # a live target: a table over the lock budget stops the run

    @property
    def over_budget(self) -> bool:
        """True when a table's writes stay blocked longer than the budget, unallowed, on a live target."""
        return bool(self.budget_enforced and self.locks and self.locks.stopping)

    @property
    def ok(self) -> bool:
        """True when the copy passed its post-checks, its SQL has no lint error and no lock breaks the budget."""
        sql_errors = any(f.severity == "error" for f in self.sql_findings)
        return (self.checks is None or self.checks.ok) and not sql_errors and not self.over_budget

    def problem(self) -> str | None:
        """Return one line naming the first failed check of the copy (None when it passed)."""
        return self.checks.first_problem() if self.checks is not None else None

    @property
    def apply_seconds(self) -> float:
        return sum(r.seconds for r in self.results)

    def to_dict(self) -> dict:
        return {
            "scratch_database": self.scratch_database, "backup_key": self.backup_key,
            "restore_seconds": self.restore_seconds, "apply_seconds": self.apply_seconds,
            "results": [{"name": r.name, "seconds": r.seconds, "sql": list(r.sql)}
                        for r in self.results],
            "checks": self.checks.to_dict() if self.checks else None,
            "sql_findings": [f.to_dict() for f in self.sql_findings],
            "server": self.server, "method": self.method, "leftovers": self.leftovers.to_dict(),
            "dropped_columns": [d.to_dict() for d in self.dropped_columns],
            "on_production_cluster": self.on_production_cluster,
            "locks": self.locks.to_dict() if self.locks else None,
            "budget_enforced": self.budget_enforced,
        }


@dataclass
class ScratchCopy:
    """A scratch copy made for one run: where, how and how fast; claimed until it is dropped.

    The claim (dbcore.deploy.scratch) is a session of the rehearsal server: while it is open no
    other run takes the copy for a leftover. It is not pickled: a copy that crossed a process
    boundary is simply unclaimed, and the next run's sweep drops it if it was left behind.
    """

    server: RehearsalServer
    target: Target
    method: str  # "stream" (restored from the backup's stream), "template" or "restore"
    seconds: float
    leftovers: Leftovers = field(default_factory=Leftovers)
    holder: Any = None  # the claiming session (a psycopg2 connection)

    def release(self) -> None:
        """Close the claiming session (the copy is dropped, or left to the next run's sweep)."""
        if self.holder is not None:
            self.holder.close()
            self.holder = None

    def discard(self) -> None:
        """Drop the copy (quietly: a failure is logged, the next run's sweep drops it) and release it."""
        drop_quietly(self.server, self.target.dbname)
        self.release()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "holder": None}


def _start_copy(target: Target, server: RehearsalServer, run_id: str,
                settings: Settings) -> tuple[Target, Leftovers, Any]:
    """Check ``server`` is allowed, drop what dead runs left there, then claim this run's scratch name."""
    refuse_the_target_cluster(server, target)
    if settings.rehearsal_same_major:  # before any copy is made: it would be measured on the wrong major
        check_major(_server_major(server.admin), _server_major(target), settings)
    leftovers = drop_leftovers(server, target.dbname)
    scratch = server.scratch(scratch_name(target.dbname, run_id))
    if server.on_target and scratch.dbname == target.dbname:  # never; the one line that must hold
        raise RehearsalFailed("the scratch database would be the live one")
    return scratch, leftovers, claim(server, scratch.dbname)


def _server_major(target: Target) -> int:
    with raw_session(target, "dbmigrate rehearsal") as conn:
        return server_major(conn)


def backup_into_copy(target: Target, server: RehearsalServer, settings: Settings, run_id: str, *,
                     progress: BytesProgress | None = None,
                     restore_progress: BytesProgress | None = None,
                     template: bool = True) -> tuple[BackupInfo, ScratchCopy]:
    """Back ``target`` up to S3 and make the rehearsal's copy on ``server`` meanwhile.

    The copy is restored from the backup's own stream as it uploads (sha256 and size compared
    before the upload completes), or, locally on the target's cluster with nobody else
    connected (and ``template``), made by ``CREATE DATABASE ... TEMPLATE`` just before the
    backup. Returns the stored backup and the claimed copy; raises BackupFailed for the backup,
    RehearsalFailed for the copy (then no backup is stored either, and the copy is dropped).
    """
    scratch, leftovers, holder = _start_copy(target, server, run_id, settings)
    started = time.monotonic()
    try:
        if (template and server.on_target and target.env is Env.LOCAL
                and copy_with_template(server, target.dbname, scratch.dbname)):
            method, copied = "template", round(time.monotonic() - started, 3)
            # the copy did not come from the backup: pg_restore still reads the stored bytes whole
            with ArchiveCheck(_server_major(target), progress=restore_progress) as check:
                info = backup_to_s3(target, settings, progress=progress, tee=check)
        else:
            method = "stream"
            create_database(server, scratch.dbname)
            with StreamRestore(scratch, str(target.env), progress=restore_progress) as restore:
                info = backup_to_s3(target, settings, progress=progress, tee=restore)
            copied = round(time.monotonic() - started, 3)
    except (RestoreFailed, RestoreRefused, BackupCorrupt) as exc:
        drop_quietly(server, scratch.dbname)
        holder.close()
        raise RehearsalFailed(f"the backup does not restore into a copy, the live database was "
                              f"not touched: {exc}") from exc
    except BaseException:
        drop_quietly(server, scratch.dbname)
        holder.close()
        raise
    log.info("rehearsal copy %s made on %s (%s) in %.2fs", scratch.dbname, server.where, method,
             copied)
    return info, ScratchCopy(server, scratch, method, copied, leftovers, holder)


def restore_into_copy(target: Target, server: RehearsalServer, settings: Settings, run_id: str,
                      backup_key: str, progress: BytesProgress | None = None) -> ScratchCopy:
    """Make the rehearsal's copy on ``server`` by restoring ``backup_key``; raise RehearsalFailed."""
    scratch, leftovers, holder = _start_copy(target, server, run_id, settings)
    started = time.monotonic()
    try:
        create_database(server, scratch.dbname)
        # A scratch copy, never the live database: the production guard does not apply.
        restore_backup(backup_key, scratch, settings, allow_production=True, progress=progress)
    except BaseException:
        drop_quietly(server, scratch.dbname)
        holder.close()
        raise
    return ScratchCopy(server, scratch, "restore", round(time.monotonic() - started, 3),
                       leftovers, holder)


def large_update_findings(large: LargeUpdates) -> list[Finding]:
    """DS108: each UPDATE/DELETE of the batch that changed more rows on the copy than the setting allows."""
    return [finding("DS108", f"{name}.py", number,
                    f"{sql} changed {rows} rows on the copy inside the batch's transaction, each locked "
                    "until the commit (the application's writes to them wait): use migrator.backfill, "
                    "which updates in short batches after the commit (docs/migrations.md)")
            for name, number, rows, sql in large.found]


def check_major(rehearsal_major: int, target_major: int, settings: Settings) -> None:
    """Refuse a rehearsal server of another major when MIGRATE_REHEARSAL_SAME_MAJOR is set."""
    if settings.rehearsal_same_major and rehearsal_major != target_major:
        raise RehearsalMajorMismatch(
            f"the rehearsal server runs PostgreSQL {rehearsal_major} and the target runs "
            f"{target_major}, and MIGRATE_REHEARSAL_SAME_MAJOR=1 requires the same major: point "
            f"MIGRATE_REHEARSAL_DATABASE_URL at a PostgreSQL {target_major} server "
            "(docs/lock-verdict.md), or unset MIGRATE_REHEARSAL_SAME_MAJOR")


def lint_captured_sql(results: tuple[MigrationResult, ...], existing_tables: set[str] | None,
                      allow_destructive: bool = False,
                      files: dict[str, Path] | None = None) -> list[Finding]:
    """Return the SQL lint findings on what each migration really sent, judged as the static lint judges.

    The migrations of one transaction share one batch: a constraint added NOT VALID in one and
    validated in the next is still one transaction's lock. Each finding carries the file and the
    line of the migrator call that queued the statement, so that the file's own allows apply
    (``allow_destructive = True``, a line's ``# dbmigrate: allow RULE``) as well as the run's
    ``allow_destructive``. Statements the product sends itself (the history it reads, peewee's
    introspection, a savepoint) have no line in the file and are not judged.
    """
    findings: list[Finding] = []
    batch: SqlBatch | None = None
    for r in results:
        if batch is None or not r.atomic or not batch.in_transaction:
            batch = SqlBatch(existing_tables=existing_tables, allow_destructive=allow_destructive,
                             in_transaction=r.atomic,
                             new_tables=batch.created if batch is not None else ())
        path = (files or {}).get(r.name)
        source = _source_of(path)
        batch.source = str(path) if path else f"{r.name}.py"
        batch.allow_destructive = allow_destructive or declares_allow_destructive(source)
        lines = r.lines or (None,) * len(r.sql)
        found: list[Finding] = []
        for number, (captured, line) in enumerate(zip(r.sql, lines), 1):
            if line is None and r.lines:
                continue  # the product's own statement
            found += batch.check(captured.split(" -- params: ")[0], line or number)
        findings += apply_allow_markers(found, source)
    return findings


def _source_of(path: Path | None) -> str:
    try:
        return path.read_text(encoding="utf-8") if path else ""
    except (OSError, UnicodeDecodeError):
        return ""


def _existing_tables(target: Target) -> set[str]:
    with raw_session(target, "dbmigrate rehearsal") as conn:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT tablename FROM pg_tables WHERE schemaname NOT IN "
                            "('pg_catalog', 'information_schema')")
                return {row[0] for row in cur.fetchall()}
        except psycopg2.Error as exc:
            raise RehearsalFailed(f"cannot read the tables of the copy: "
                                  f"{redact(str(exc).strip(), target.password)}") from None


def _on_the_copy(plan: Plan, scratch: Target, settings: Settings, models, run_id: str,
                 allow_destructive: bool, locks: tuple[bool, int, str],
                 progress: Progress | None = None
                 ) -> tuple[tuple[MigrationResult, ...], CheckReport | None, list[Finding],
                            tuple[DroppedColumn, ...], LockVerdict, tuple[tuple[str, ...], tuple[str, ...]]]:
    """(In a child process.) Apply ``plan`` on the copy measuring its locks, check it, lint the SQL it sent.

    ``locks`` is (allow_long_locks, the live server's major, where the copy is) for the verdict.
    """
    if isinstance(models, str):  # the application's models, imported here, never in the run
        models = load_models(models)
    allow_long_locks, target_major, where = locks
    existing = _existing_tables(scratch)
    before = drift_before(scratch, models)
    drops, meter = DropCounter(), LockMeter(scratch)
    large = LargeUpdates(settings.large_update_rows)
    report = execute(plan, scratch, settings, run_id=run_id, actor="rehearsal",
                     progress=progress,
                     # LargeUpdates has RunObserver's methods; backfill.py cannot import observe (a cycle)
                     observers=[drops, meter, cast(RunObserver, large)])
    files = {m.name: m.path for m in plan.migrations}
    verdict = judge(meter.report(), budget=settings.lock_budget, files=files,
                    allow_long_locks=allow_long_locks, target_major=target_major, server=where)
    # the team's own checks of the data too: verify() of these migrations,
    # migrations/checks/*.sql and MIGRATE_VERIFY_COMMAND against the copy
    data = DataChecks.of(settings, [m.path for m in plan.migrations], rehearsal=True)
    checks = run_post_checks(scratch, models, before=before, data=data)
    findings = lint_captured_sql(report.results, existing, allow_destructive, files)
    findings += large_update_findings(large)
    return (report.results, checks, findings, tuple(drops.dropped), verdict,
            (report.steps, report.phase_timings))


def rehearse_on_copy(plan: Plan, target: Target, settings: Settings, backup_key: str, *,
                     copy: ScratchCopy | None = None, server: RehearsalServer | None = None,
                     models: str | list[type[peewee.Model]] | None = None, run_id: str | None = None,
                     allow_destructive: bool = False, progress: Progress | None = None,
                     restore_progress: BytesProgress | None = None, allow_long_locks: bool = False,
                     target_major: int | None = None) -> RehearsalReport:
    """Apply ``plan`` on a scratch copy of ``target``, measuring every lock, check it, drop it.

    ``copy`` is the one :func:`backup_into_copy` made; without it, ``backup_key`` is restored
    into a new one on ``server`` (default: :func:`rehearsal_server` of the target).
    ``target_major`` is the live server's PostgreSQL major (read from ``target`` when None).
    Returns the report, with the lock verdict judged against MIGRATE_LOCK_BUDGET; raises
    RehearsalFailed (RehearsalMajorMismatch for another major when the same is required; the
    copy is always dropped). The migration code (and the application's ``models``, given as
    ``module:LIST``) runs in a child process whose environment names the copy and no other
    database (dbcore.sandbox): code that connects to ``DATABASE_URL`` by itself reaches the
    copy, never the target.
    """
    run_id = run_id or uuid.uuid4().hex
    if copy is None:
        copy = restore_into_copy(target, server or rehearsal_server(target, settings), settings,
                                 run_id, backup_key, restore_progress)
    scratch = copy.target
    # what the child sees: the copy as DATABASE_URL, no password of the target's
    env = review_env(target.password, *settings.secrets(), database_url=scratch.url)
    seen = settings.model_copy(update={"database_url": SecretStr(scratch.url),
                                       "rehearsal_database_url": None})
    try:
        target_major = target_major or _server_major(target)
        check_major(_server_major(scratch), target_major, settings)
        try:
            results, checks, findings, dropped, verdict, phases = call_with_plan(
                _on_the_copy, plan, scratch, seen, models, run_id, allow_destructive,
                (allow_long_locks, target_major, copy.server.where), plan=plan,
                target=scratch, settings=settings, env=env, progress=progress,
                what="the rehearsal")
        except DbcoreError as exc:
            raise RehearsalFailed(f"rehearsal on a copy failed, the live database was not "
                                  f"touched: {exc}") from exc
        result = RehearsalReport(scratch.dbname, backup_key, copy.seconds, results,
                                 checks, tuple(findings), server=copy.server.where,
                                 method=copy.method, leftovers=copy.leftovers,
                                 dropped_columns=dropped, locks=verdict,
                                 budget_enforced=target.env is not Env.LOCAL,
                                 on_production_cluster=copy.server.on_target
                                 and target.env is not Env.LOCAL,
                                 steps=phases[0], phase_timings=phases[1])
    except BaseException:
        drop_quietly(copy.server, scratch.dbname)  # the original error is reported
        copy.release()
        raise
    try:
        drop_database(copy.server, scratch.dbname)
    finally:
        copy.release()
    return result


def drop_quietly(server: RehearsalServer, dbname: str) -> None:
    """Drop scratch database ``dbname``; a failure is logged (the next run's sweep drops it)."""
    try:
        drop_database(server, dbname)
    except Exception as exc:  # noqa: BLE001 - reported, never masking the error being raised
        log.warning("could not drop the scratch database %s (%s): the next run drops it", dbname,
                    error_line(exc, server.admin.password))
