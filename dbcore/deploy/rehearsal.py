"""Rehearse a plan on a copy: restore the backup into a scratch database, apply there, check, drop.

The rehearsal proves three things before anyone approves: the backup restores, the migrations
apply to the real data (with the SQL and timings captured), and the result passes the
post-checks. The live database is only read (by the backup).
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field

import peewee
import psycopg2
from psycopg2 import sql

from dbcore.backup.dump import BackupInfo, backup_to_s3
from dbcore.backup.dump import Progress as BytesProgress
from dbcore.backup.restore import restore_backup
from dbcore.backup.stream import StreamRestore
from dbcore.checks.post import CheckReport, drift_before, run_post_checks
from dbcore.connection import Target, connect_raw
from dbcore.errors import BackupCorrupt, DbcoreError, RehearsalFailed, RestoreFailed, RestoreRefused
from dbcore.lint.report import Finding
from dbcore.lint.sql_rules import SqlBatch
from dbcore.migrate.plan import MigrationResult, Plan, Progress
from dbcore.migrate.runner import execute
from dbcore.redact import redact
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

    @property
    def ok(self) -> bool:
        """True when the copy passed its post-checks and its SQL has no lint error."""
        sql_errors = any(f.severity == "error" for f in self.sql_findings)
        return (self.checks is None or self.checks.ok) and not sql_errors

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
        }


def derived_name(dbname: str, suffix: str) -> str:
    """Return ``dbname`` cut to fit ``suffix`` within PostgreSQL's 63 bytes (never mid-character)."""
    room = 63 - len(suffix.encode())
    head = dbname.encode()[:room].decode(errors="ignore")
    return head + suffix


def scratch_name(dbname: str, run_id: str | None = None) -> str:
    """Return a scratch database name derived from ``dbname`` (at most 63 bytes)."""
    return derived_name(dbname, f"_rehearsal_{(run_id or uuid.uuid4().hex)[:8]}")


def scratch_target(target: Target, settings: Settings, run_id: str | None = None) -> Target:
    """Return where the rehearsal's copy of ``target`` is made: a scratch database beside it."""
    scratch = target.with_dbname(scratch_name(target.dbname, run_id))
    if scratch.dbname == target.dbname:  # never, but this is the one line that must hold
        raise RehearsalFailed("the scratch database would be the live one")
    return scratch


def backup_into_copy(target: Target, scratch: Target, settings: Settings, *,
                     progress: BytesProgress | None = None,
                     restore_progress: BytesProgress | None = None) -> tuple[BackupInfo, float]:
    """Back ``target`` up to S3 and restore the same stream into ``scratch`` while it uploads.

    Returns the stored backup and the seconds until the copy was complete. The copy is made of
    exactly the bytes stored (sha256 and size compared before the upload completes); raises
    BackupFailed for the backup, RehearsalFailed for the copy (then no backup is stored either,
    and ``scratch`` is dropped).
    """
    started = time.monotonic()
    try:
        with StreamRestore(scratch, str(target.env), progress=restore_progress) as restore:
            info = backup_to_s3(target, settings, progress=progress, tee=restore)
    except (RestoreFailed, RestoreRefused, BackupCorrupt) as exc:
        drop_quietly(target, scratch.dbname)
        raise RehearsalFailed(f"the backup does not restore into a copy, the live database was "
                              f"not touched: {exc}") from exc
    except BaseException:
        drop_quietly(target, scratch.dbname)
        raise
    return info, round(time.monotonic() - started, 3)


def drop_database(server: Target, dbname: str) -> None:
    """Drop ``dbname`` on ``server``'s cluster, ending its sessions; raise RehearsalFailed."""
    if dbname == server.dbname:
        raise RehearsalFailed(f"refusing to drop {dbname}: it is the live database")
    conn = connect_raw(server.with_dbname("postgres"), "dbmigrate-rehearsal")
    try:
        with conn.cursor() as cur:
            cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(dbname)))
    except psycopg2.Error as exc:
        raise RehearsalFailed(f"could not drop the scratch database {dbname}: "
                              f"{redact(str(exc).strip(), server.password)}: drop it by hand") from None
    finally:
        conn.close()


def lint_captured_sql(results: tuple[MigrationResult, ...], existing_tables: set[str] | None,
                      allow_destructive: bool = False) -> list[Finding]:
    """Return the SQL lint findings on what each migration really sent.

    The migrations of one transaction share one batch: a constraint added NOT VALID in one and
    validated in the next is still one transaction's lock.
    """
    findings: list[Finding] = []
    batch: SqlBatch | None = None
    for r in results:
        if batch is None or not r.atomic or not batch.in_transaction:
            batch = SqlBatch(existing_tables=existing_tables, allow_destructive=allow_destructive,
                             in_transaction=r.atomic,
                             new_tables=batch.created if batch is not None else ())
        batch.source = f"{r.name}.py (rehearsal)"
        for line, captured in enumerate(r.sql, 1):
            findings += batch.check(captured.split(" -- params: ")[0], line)
    return findings


def _existing_tables(target: Target) -> set[str]:
    conn = connect_raw(target, "dbmigrate-rehearsal")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT tablename FROM pg_tables WHERE schemaname NOT IN "
                        "('pg_catalog', 'information_schema')")
            return {row[0] for row in cur.fetchall()}
    except psycopg2.Error as exc:
        raise RehearsalFailed(f"cannot read the tables of the copy: "
                              f"{redact(str(exc).strip(), target.password)}") from None
    finally:
        conn.close()


def rehearse_on_copy(plan: Plan, target: Target, settings: Settings, backup_key: str, *,
                     models: list[type[peewee.Model]] | None = None, run_id: str | None = None,
                     allow_destructive: bool = False, progress: Progress | None = None,
                     restore_progress: BytesProgress | None = None,
                     restored: tuple[Target, float] | None = None) -> RehearsalReport:
    """Restore ``backup_key`` into a scratch database, apply ``plan`` there, check it, drop it.

    ``restored``: the copy is already made (by :func:`backup_into_copy`): its target and the
    seconds it took. Returns the report; raises RehearsalFailed (the copy is always dropped).
    """
    scratch = restored[0] if restored else scratch_target(target, settings, run_id)
    if scratch.dbname == target.dbname:  # never, but this is the one line that must hold
        raise RehearsalFailed("the scratch database would be the live one")
    started = time.monotonic()
    try:
        if restored:
            restore_seconds = restored[1]
        else:
            # A scratch copy, never the live database: the production guard does not apply.
            restore_backup(backup_key, scratch, settings, allow_production=True,
                           progress=restore_progress)
            restore_seconds = round(time.monotonic() - started, 3)
        existing = _existing_tables(scratch)
        before = drift_before(scratch, models)
        try:
            report = execute(plan, scratch, settings, run_id=run_id, actor="rehearsal",
                                progress=progress)
        except DbcoreError as exc:
            raise RehearsalFailed(f"rehearsal on a copy failed, the live database was not "
                                  f"touched: {exc}") from exc
        checks = run_post_checks(scratch, models, before=before)
        findings = lint_captured_sql(report.results, existing, allow_destructive)
        result = RehearsalReport(scratch.dbname, backup_key, restore_seconds, report.results,
                                 checks, tuple(findings))
    except BaseException:
        drop_quietly(target, scratch.dbname)  # the original error is the one to report
        raise
    drop_database(target, scratch.dbname)
    return result


def drop_quietly(server: Target, dbname: str) -> None:
    """Drop ``dbname`` on ``server``'s cluster; a failure is logged, never raised."""
    try:
        drop_database(server, dbname)
    except Exception as exc:  # noqa: BLE001 - reported, never masking the error being raised
        log.warning("could not drop the scratch database %s (%s): drop it by hand", dbname,
                    redact(str(exc).strip(), server.password))
