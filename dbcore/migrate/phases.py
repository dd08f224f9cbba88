"""The phases of an apply after the batch's commit: index builds, backfills, validation.

Phase 1 is the batch's transaction (dbcore.migrate.runner). The safe forms (dbcore.migrate.safe_forms)
and ``migrator.backfill`` move work out of it as steps, written to ``migration_phase_step`` inside
that same transaction: if the batch rolls back, so do they; once it commits, they are the record
of what is left. :func:`run_phases` then runs the pending steps, phase by phase, in the order they
were written:

2. concurrent index builds and drops, each in autocommit under ``lock_timeout``, retried
   ``lock_retries`` times with backoff when a lock (or an older snapshot) is in the way; an
   INVALID index left by a failed build is dropped before the next try;
3. backfills, one short transaction per primary-key range (dbcore.migrate.backfill);
4. validation: ``VALIDATE CONSTRAINT`` (SHARE UPDATE EXCLUSIVE: writes go on), then for a NOT NULL
   the ``SET NOT NULL`` the validated CHECK makes instant, and the CHECK dropped.

A step marks itself done in the database when it is done; a run that stops (a crash, a lock that
stayed busy, rows that fail a validation) leaves the rest pending and the schema valid (every
phase-1 change stands on its own), and the next ``dbmigrate apply`` continues from there.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import peewee
import psycopg2

from dbcore.errors import MigrationFileError, PhaseFailed
from dbcore.migrate.backfill import run_backfill
from dbcore.migrate.history import AUDIT_TABLE, record_audit
from dbcore.migrate.safe_forms import BACKFILL, DROP_INDEX, INDEX, NOT_NULL, PHASE_NAMES, Step
from dbcore.redact import error_line
from dbcore.settings import Settings

log = logging.getLogger(__name__)

STEP_TABLE = "migration_phase_step"

_CREATE = f"""
CREATE TABLE IF NOT EXISTS {STEP_TABLE} (
    id          bigserial PRIMARY KEY,
    run_id      text        NOT NULL,
    migration   text        NOT NULL,
    phase       integer     NOT NULL,
    kind        text        NOT NULL,
    tbl         text        NOT NULL,
    name        text        NOT NULL,
    sql         jsonb       NOT NULL,
    plain       jsonb       NOT NULL,
    detail      jsonb       NOT NULL DEFAULT '{{}}',
    state       text        NOT NULL DEFAULT 'pending',
    attempts    integer     NOT NULL DEFAULT 0,
    error       text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    done_at     timestamptz
)
"""

_LOCK_NOT_AVAILABLE = "55P03"


@dataclass(frozen=True)
class PhaseEvent:
    """Reported while the phases run: a step started, made progress, or ended."""

    phase: int
    step: str
    message: str
    #: a backfill's keys done and its last key (0, 0 for other steps)
    done: int = 0
    total: int = 0


PhaseProgress = Callable[[PhaseEvent], None]


@dataclass
class PhaseReport:
    """What the phases after the batch did: the last phase reached and each step's outcome."""

    reached: int = 1
    done: list[str] = field(default_factory=list)
    pending: int = 0
    #: how long each step took ("backfill label on item: 3.20s"): on a rehearsal copy, the ETA
    timings: list[str] = field(default_factory=list)

    def line(self) -> str:
        if not self.done and not self.pending:
            return ""
        return (f"reached phase {self.reached} ({PHASE_NAMES[self.reached]}): "
                f"{len(self.done)} step(s) after the batch done")


def _exists(db: peewee.Database) -> bool:
    return db.execute_sql("SELECT to_regclass(%s) IS NOT NULL", (STEP_TABLE,)).fetchone()[0]


class StepStore:
    """Writes the steps of one run inside the batch's transaction."""

    def __init__(self, db: peewee.Database, run_id: str) -> None:
        self.db = db
        self.run_id = run_id
        self._ready = False

    def record(self, step: Step) -> None:
        if not self._ready:
            self._send(_CREATE + ";SELECT 1", ())
            self._ready = True
        detail = {k: v for k, v in step.detail.items() if not k.startswith("_")}
        step.id = self._send(
            f"INSERT INTO {STEP_TABLE} (run_id, migration, phase, kind, tbl, name, sql, plain, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (self.run_id, step.migration, step.phase, step.kind, step.table, step.name,
             json.dumps(step.sql), json.dumps(step.plain), json.dumps(detail)))[0]

    def mark_plain(self, step: Step) -> None:
        if step.id is not None:
            self._send(f"UPDATE {STEP_TABLE} SET state = 'plain', error = %s, done_at = now() "
                       "WHERE id = %s RETURNING id", (step.done_plain, step.id))

    def _send(self, sql: str, params: tuple):
        # on the connection's own cursor: bookkeeping, not part of the migration's SQL as captured
        cursor = self.db.cursor()
        try:
            cursor.execute(sql, params)
            return cursor.fetchone()
        finally:
            cursor.close()


def _row_to_step(row) -> Step:
    (id_, migration, kind, table, name, sql, plain, detail) = row
    return Step(kind, table, name, list(sql), list(plain), migration=migration, detail=dict(detail), id=id_)


def pending_steps(db: peewee.Database) -> list[Step]:
    """Return the steps not yet done, in the order they run (reads only)."""
    if not _exists(db):
        return []
    rows = db.execute_sql(
        f"SELECT id, migration, kind, tbl, name, sql, plain, detail FROM {STEP_TABLE} "
        "WHERE state IN ('pending', 'failed') ORDER BY phase, id").fetchall()
    return [_row_to_step(r) for r in rows]


def step_summary(db: peewee.Database) -> list[dict]:
    """Every step not done, with its state, attempts and last error: for ``dbmigrate status``."""
    if not _exists(db):
        return []
    rows = db.execute_sql(
        f"SELECT run_id, migration, phase, kind, tbl, name, state, attempts, error, detail FROM "
        f"{STEP_TABLE} WHERE state IN ('pending', 'failed') ORDER BY phase, id").fetchall()
    keys = ("run_id", "migration", "phase", "kind", "table", "name", "state", "attempts", "error", "detail")
    return [dict(zip(keys, r)) for r in rows]


def cancel_steps(db: peewee.Database, migrations: list[str]) -> int:
    """Cancel the pending steps of ``migrations`` (being rolled back); inside the caller's transaction."""
    if not migrations or not _exists(db):
        return 0
    cursor = db.execute_sql(
        f"UPDATE {STEP_TABLE} SET state = 'cancelled', error = 'its migration was rolled back', "
        "done_at = now() WHERE state IN ('pending', 'failed') AND migration = ANY(%s)", (list(migrations),))
    return cursor.rowcount


def allow_phase_rows(db: peewee.Database) -> None:
    """Let the audit table take 'phase N' rows (a table made before phases existed refuses them)."""
    row = db.execute_sql(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'migration_audit_action_check'"
    ).fetchone()
    if row and "phase 4" in row[0]:
        return
    with db.atomic():
        db.execute_sql(f"ALTER TABLE {AUDIT_TABLE} DROP CONSTRAINT IF EXISTS migration_audit_action_check")
        db.execute_sql(f"ALTER TABLE {AUDIT_TABLE} ADD CONSTRAINT migration_audit_action_check CHECK "
                       "(action IN ('apply', 'rollback', 'baseline', 'phase 2', 'phase 3', 'phase 4'))")


def _pgcode(exc: BaseException | None) -> str | None:
    while exc is not None:
        if isinstance(exc, psycopg2.Error) and exc.pgcode:
            return exc.pgcode
        exc = exc.__cause__ or exc.__context__
    return None


def _set(db: peewee.Database, **values) -> None:
    for name, value in values.items():
        db.execute_sql("SELECT set_config(%s, %s, false)", (name, str(value)))


class _Runner:
    def __init__(self, db, settings: Settings, run_id: str, actor: str,
                 progress: PhaseProgress | None, approval) -> None:
        self.db, self.settings, self.run_id, self.actor = db, settings, run_id, actor
        self.progress, self.approval = progress, approval

    def say(self, phase: int, step: Step, message: str, done: int = 0, total: int = 0) -> None:
        log.info("phase %s: %s: %s", phase, step.name, message)
        if self.progress is not None:
            self.progress(PhaseEvent(phase, f"{step.kind} {step.name} on {step.table}", message, done, total))

    def update(self, step: Step, **values) -> None:
        sets = ", ".join(f"{k} = %s" for k in values)
        self.db.execute_sql(f"UPDATE {STEP_TABLE} SET {sets} WHERE id = %s", (*values.values(), step.id))

    def note_failure(self, step: Step, **values) -> None:
        """Record a failed try where the session still can; a lost one must not hide the failure."""
        try:
            self.update(step, **values)
        except (peewee.PeeweeException, psycopg2.Error):
            pass

    def retrying(self, step: Step, attempt: Callable[[], None]) -> None:
        """Run ``attempt`` under lock_timeout, again after a lock timeout, with backoff."""
        delay = self.settings.lock_retry_delay
        tries = self.settings.lock_retries + 1
        for number in range(1, tries + 1):
            try:
                attempt()
                return
            except peewee.DatabaseError as exc:
                self.note_failure(step, attempts=number, error=error_line(exc, *self.settings.secrets()))
                if _pgcode(exc) != _LOCK_NOT_AVAILABLE or number == tries:
                    raise
                self.say(step.phase, step, f"lock busy (try {number} of {tries}); again in {delay:g}s")
                time.sleep(delay)
                delay *= 2

    def index(self, step: Step) -> None:
        def attempt():
            row = self.db.execute_sql(
                "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass(quote_ident(%s))",
                (step.name,)).fetchone()
            if step.kind == INDEX and row is not None:
                if row[0]:
                    return  # built by an earlier run that stopped before marking it done
                self.say(2, step, "dropping the INVALID index a failed build left")
                self.db.execute_sql(f'DROP INDEX CONCURRENTLY IF EXISTS "{step.name}"')
            for statement in step.sql:
                self.db.execute_sql(statement)
        self.retrying(step, attempt)

    def validate(self, step: Step) -> None:
        table = step.table
        if step.kind == NOT_NULL:
            check = step.detail["check"]
            present = self.db.execute_sql(
                "SELECT 1 FROM pg_constraint WHERE conrelid = to_regclass(quote_ident(%s)) AND conname = %s",
                (table, check)).fetchone()
            if present:
                self.retrying(step, lambda: self.db.execute_sql(step.sql[0]))

            def finish():
                with self.db.atomic():
                    for statement in step.sql[1:]:
                        self.db.execute_sql(statement)
            self.retrying(step, finish)
        else:
            def each() -> None:
                for statement in step.sql:
                    self.db.execute_sql(statement)
            self.retrying(step, each)

    def backfill(self, step: Step) -> None:
        function = None
        if step.detail.get("function"):
            function = self._function(step)

        def save(detail: dict) -> None:
            self.update(step, detail=json.dumps({k: v for k, v in detail.items() if not k.startswith("_")}))

        def moved(table, rows, reached, until):
            self.say(3, step, f"{rows} row(s) updated, key {reached} of {until}", reached, until)

        run_backfill(self.db, step, save, function, moved)

    def _function(self, step: Step):
        from dbcore.migrate.files import discover, load

        files = {f.name: f for f in discover(self.settings.migrations_dir)}
        if step.migration not in files:
            raise MigrationFileError(f"the backfill of {step.migration} needs its file in "
                                     f"{self.settings.migrations_dir}: restore it from version control")
        fn = load(files[step.migration]).scope.get(step.detail["function"])
        if not callable(fn):
            raise MigrationFileError(f"migration {step.migration}.py no longer defines "
                                     f"{step.detail['function']}(): its backfill cannot continue")
        return fn

    def run(self, steps: list[Step]) -> PhaseReport:
        report = PhaseReport(pending=len(steps))
        if not steps:
            return report
        allow_phase_rows(self.db)
        _set(self.db, lock_timeout=self.settings.lock_timeout, statement_timeout=0,
             max_parallel_maintenance_workers=self.settings.index_build_workers)
        try:
            for step in steps:
                report.reached = max(report.reached, step.phase)
                started = time.monotonic()
                self.say(step.phase, step, "starting")
                try:
                    if step.kind in (INDEX, DROP_INDEX):
                        self.index(step)
                    elif step.kind == BACKFILL:
                        self.backfill(step)
                    else:
                        self.validate(step)
                    self.update(step, state="done", done_at=_now(self.db))
                except Exception as exc:
                    self.note_failure(step, state="failed", error=error_line(exc, *self.settings.secrets()))
                    raise PhaseFailed(_failure(step, exc, self.settings), phase=step.phase,
                                      committed=[step.migration]) from exc
                seconds = time.monotonic() - started
                report.done.append(step.name)
                report.timings.append(f"{step.kind} {step.name} on {step.table}: {seconds:.2f}s")
                report.pending -= 1
                self.say(step.phase, step, f"done in {seconds:.2f}s")
                if not any(s.migration == step.migration and s.phase == step.phase
                           for s in steps[steps.index(step) + 1:]):
                    record_audit(self.db, name=step.migration, action=f"phase {step.phase}", checksum=None,
                                 actor=self.actor, run_id=self.run_id, duration_ms=int(seconds * 1000),
                                 approval=self.approval)
        finally:
            self.restore_session(failing=sys.exc_info()[1] is not None)
        return report

    def restore_session(self, *, failing: bool) -> None:
        """Put the session's settings back; a broken session must not hide why a step stopped."""
        try:
            _set(self.db, lock_timeout=self.settings.lock_timeout,
                 statement_timeout=self.settings.statement_timeout)
            self.db.execute_sql("RESET max_parallel_maintenance_workers")
        except Exception:
            if not failing:
                raise


def _now(db):
    return db.execute_sql("SELECT now()").fetchone()[0]


def _connection_lost(exc: Exception, code: str | None) -> bool:
    """The session is gone: a driver error without a SQLSTATE, a connection class (08), or the
    server shutting the session down (57P01-57P03)."""
    if code is None:
        return isinstance(exc, (peewee.OperationalError, peewee.InterfaceError))
    return code.startswith("08") or code in ("57P01", "57P02", "57P03")


def _failure(step: Step, exc: Exception, settings: Settings) -> str:
    what = (f"phase {step.phase} ({PHASE_NAMES[step.phase]}) of {step.migration}: "
            f"{step.kind} {step.name} on {step.table}")
    detail = error_line(exc, *settings.secrets())
    code = _pgcode(exc)
    if _connection_lost(exc, code):
        fix = ("the connection to the server was lost: run `dbmigrate apply` again once it is "
               "back (it continues here)")
    elif code == _LOCK_NOT_AVAILABLE:
        fix = ("a lock or an older transaction stayed in the way through every retry: run "
               "`dbmigrate apply` again when traffic is lower (it continues here)")
    elif code in ("23514", "23503", "23502"):
        fix = ("rows violate it: fix those rows, then run `dbmigrate apply` again (it continues "
               "here; the constraint stays NOT VALID meanwhile, enforced for new writes)")
    else:
        fix = "fix the cause, then run `dbmigrate apply` again (it continues here)"
    return (f"{what} failed: {type(exc).__name__}: {detail}; the batch is committed and valid "
            f"as it is; {fix}")


def run_phases(db: peewee.Database, settings: Settings, *, run_id: str, actor: str,
               progress: PhaseProgress | None = None, approval=None) -> PhaseReport:
    """Run every pending step (phases 2, 3, 4), outside any transaction; raise PhaseFailed."""
    return _Runner(db, settings, run_id, actor, progress, approval).run(pending_steps(db))


def describe_steps(steps: list[Step]) -> list[str]:
    """The SQL each step runs, by phase: for the plan."""
    lines = []
    for step in steps:
        head = (f"phase {step.phase} ({PHASE_NAMES[step.phase]}) {step.migration}: "
                f"{step.kind} {step.name} on {step.table}")
        if step.done_plain:
            head = f"phase 1, plain form ({step.done_plain}) {step.migration}: {step.kind} {step.name}"
        lines.append(head)
        body = step.plain if step.done_plain else step.sql
        if step.kind == BACKFILL and not step.done_plain:
            d = step.detail
            body = [f"{s} WHERE {d['pk']} in ranges of {d['batch_size']}"
                    f"{' AND (' + d['where'] + ')' if d.get('where') else ''}, pause {d['pause']:g}s"
                    for s in step.sql] or [f"{d.get('function')}(database, low, high) over ranges of "
                                           f"{d['batch_size']}"]
        lines += [f"    {s};" for s in body]
    return lines
