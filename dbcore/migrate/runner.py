"""Plan, then apply: pending migrations in one transaction under the migration lock; rollbacks.

``plan_apply`` and ``plan_rollback`` (dbcore.migrate.plan) decide and return data; :func:`execute`
acts on that data. Every migration of a plan runs inside ONE transaction (peewee-migrate's
per-migration transactions become savepoints), so a failure anywhere leaves the database exactly
as before. A migration that declares ``atomic = False`` cannot run in a transaction
(CREATE INDEX CONCURRENTLY): it splits the plan into phases and runs alone, in autocommit,
after the phase before it has committed (docs/migrations.md).
"""

from __future__ import annotations

import logging
import time
import uuid

import peewee
import psycopg2

from dbcore.checks.post import check_no_invalid_indexes
from dbcore.connection import Target, connect
from dbcore.errors import (
    MigrationFailed,
    MigrationFileError,
    NonAtomicFailed,
    PlanOutdated,
    TableLockTimeout,
    TransactionBroken,
)
from dbcore.migrate.files import LoadedMigration, MigrationFile, load
from dbcore.migrate.history import ApprovalRecord, default_actor, ensure_audit_table, record_audit
from dbcore.migrate.locking import configure_session, migration_lock
from dbcore.migrate.phases import StepStore, cancel_steps, describe_steps, run_phases
from dbcore.migrate.plan import (
    Action,
    MigrationResult,
    Plan,
    Progress,
    ProgressEvent,
    RunReport,
    read_state,
)
from dbcore.migrate.router import FileRouter
from dbcore.migrate.safe_forms import SafeForms
from dbcore.redact import error_line
from dbcore.settings import Settings

log = logging.getLogger(__name__)

#: SQLSTATEs a caller may retry after: the batch was rolled back because a lock was busy
_LOCK_NOT_AVAILABLE = "55P03"
_QUERY_CANCELED = "57014"


class _SqlRecorder:
    """Records the statements one database object sends while recording is on.

    It wraps that object's ``execute_sql`` only: no global logger or patch, so two runs in one
    process (a rehearsal and an apply, or tests in threads) never see each other's SQL.
    """

    def __init__(self, db: peewee.Database) -> None:
        self.statements: list[str] | None = None
        original = db.execute_sql

        def execute_sql(sql, params=None, *args, **kwargs):
            if self.statements is not None:
                self.statements.append(sql if not params else f"{sql} -- params: {list(params)!r}")
            return original(sql, params, *args, **kwargs)

        db.execute_sql = execute_sql

    def __enter__(self) -> list[str]:
        self.statements = []
        return self.statements

    def __exit__(self, *exc) -> None:
        self.statements = None


def _xact_id(db: peewee.Database) -> str:
    """Return the current transaction's id (assigning one): it changes if a migration commits."""
    return str(db.execute_sql("SELECT pg_current_xact_id()").fetchone()[0])


def _run_alone(db: peewee.Database, run, m: MigrationFile, committed: list[str]) -> None:
    """Run an ``atomic = False`` migration; raise NonAtomicFailed if it fails or leaves an INVALID index."""
    before = {i.index for i in check_no_invalid_indexes(db)}
    try:
        run()
        error = None
    except Exception as exc:  # its statements ran in autocommit: nothing was rolled back
        error = exc
    invalid = sorted({i.index for i in check_no_invalid_indexes(db)} - before)
    if error is None and not invalid:
        return
    kept = f"committed before it: {', '.join(committed)}; " if committed else ""
    what = f"failed: {type(error).__name__}: {error_line(error)}" if error else "succeeded"
    fix = (f"it left INVALID index(es) {', '.join(invalid)}: DROP INDEX CONCURRENTLY IF EXISTS "
           f"each, then run again" if invalid else "check what it did, then run again")
    raise NonAtomicFailed(f"migration {m.name}.py (atomic = False, runs in autocommit) {what}; "
                          f"{kept}{fix}", committed=committed) from error


class _DryRunRollback(Exception):
    """Raised inside the batch transaction of a dry run to roll it back."""


def _pgcode(exc: BaseException) -> str | None:
    """Return the SQLSTATE behind a peewee/psycopg2 error, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        code = getattr(exc, "pgcode", None)
        if code:
            return code
        if exc.args and isinstance(exc.args[0], psycopg2.Error):
            return exc.args[0].pgcode
        exc = exc.__cause__ or exc.__context__
    return None


def _typed_failure(exc: Exception, name: str, action: Action, committed: list[str], settings: Settings,
                   target: Target, router: FileRouter | None = None) -> Exception:
    """Return the typed error for ``exc`` raised while running migration ``name``.

    It carries the migrations already committed; a retry is safe only when nothing at all was.
    ``name`` is empty when the failure came before the first migration started; the applied
    files whose replay failed (``router.replayed``) are named after the error.
    """
    code = _pgcode(exc)
    kept = (f"; already committed before it: {', '.join(committed)}" if committed
            else "; nothing was changed (the whole batch was rolled back)")
    detail = error_line(exc, target.password)
    if not name:
        return MigrationFailed(f"{action} failed before its first migration started: "
                               f"{type(exc).__name__}: {detail}{kept}: fix that, then run again",
                               committed=committed)
    if isinstance(exc, MigrationFileError):  # an unknown model names the failed replays itself
        return type(exc)(f"migration {name}.py: {exc}{kept}")
    problems = router.replayed.problems if router is not None and router.replayed else ()
    detail += "".join(f" (after {p.describe()})" for p in problems)
    if code == _LOCK_NOT_AVAILABLE:
        return TableLockTimeout(
            f"{action} of {name} waited longer than lock_timeout={settings.lock_timeout} for a "
            f"table lock held by the application{kept}: retry when traffic is lower, or raise "
            "MIGRATE_LOCK_TIMEOUT", committed=committed, retryable=not committed)
    if code == _QUERY_CANCELED:
        return MigrationFailed(
            f"{action} of {name} ran longer than statement_timeout={settings.statement_timeout}"
            f"{kept}: raise MIGRATE_STATEMENT_TIMEOUT or split the migration", committed=committed)
    where = "rollback()" if action == "rollback" else "migrate()"
    return MigrationFailed(f"{action} of {name} failed: {type(exc).__name__}: {detail}{kept}: "
                           f"fix {where} in {name}.py and run again", committed=committed)


def _run_one(db, recorder: _SqlRecorder, router: FileRouter, migrator, loaded: LoadedMigration,
             action: Action, actor: str, run_id: str, approval: ApprovalRecord | None) -> MigrationResult:
    name = loaded.file.name
    started = time.monotonic()
    if migrator.safe is not None:
        migrator.safe.begin_file(name, loaded.scope)
    with recorder as statements:
        if action == "apply":
            loaded.migrate(migrator, db, fake=False)
        else:
            cancel_steps(db, [name])  # what is left of its phases would act on what it undoes
            loaded.rollback(migrator, db, fake=False)
        migrator.flush()
    seconds = time.monotonic() - started
    if action == "apply":
        router.model.create(name=name)
    else:
        router.model.delete().where(router.model.name == name).execute()
    record_audit(db, name=name, action=action, checksum=loaded.file.sha256, actor=actor,
                 run_id=run_id, duration_ms=int(seconds * 1000), approval=approval)
    log.info("%s %s in %.2fs", action, name, seconds)
    return MigrationResult(name, seconds, tuple(statements), loaded.file.atomic)


def execute(plan: Plan, target: Target, settings: Settings, *, actor: str | None = None,
            run_id: str | None = None, dry_run: bool = False, progress: Progress | None = None,
            approval: ApprovalRecord | None = None, phase_progress=None) -> RunReport:
    """Run ``plan`` (an apply or a rollback) under the migration lock, in one transaction per phase.

    ``approval`` (who approved, why, the plan's fingerprint) goes into every audit row. Raises
    MigrationFailed (or a subclass) carrying what was committed; PlanOutdated when the history or
    a file changed since the plan was made.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    actor = default_actor(actor or settings.actor)
    if plan.empty and not plan.steps_pending:
        return RunReport(plan.action, plan.database, run_id, note="up to date")
    with migration_lock(target, settings, f"{plan.action} by {actor}"):
        db = connect(target, application_name=f"dbmigrate {plan.action} by {actor}"[:63])
        try:
            return _execute_locked(plan, db, target, settings, actor, run_id, dry_run, progress,
                                   approval, phase_progress)
        finally:
            db.close()


def _execute_locked(plan, db, target, settings, actor, run_id, dry_run, progress,
                    approval, phase_progress=None) -> RunReport:
    # Under the lock the history is final: a plan made before it may be stale.
    files, applied = read_state(target, settings, db)
    if tuple(applied) != plan.applied_before:
        if plan.action == "apply" and set(plan.names) <= set(applied):
            return RunReport(plan.action, plan.database, run_id,
                             note="up to date (another run applied these meanwhile)")
        raise PlanOutdated(
            f"the migration history of {target.dbname!r} changed since the plan was made: "
            "plan again and review it")
    current_files = {f.name: f.sha256 for f in files}
    for m in plan.migrations:
        if current_files.get(m.name) != m.sha256:
            raise PlanOutdated(
                f"migration {m.path.name} changed on disk since the plan was made: "
                "plan again and review it")
    configure_session(db, settings)
    recorder = _SqlRecorder(db)
    loaded = {m.name: load(m) for m in plan.migrations}
    router = FileRouter(db, settings.migrations_dir)
    results: list[MigrationResult] = []
    committed: list[str] = []
    skipped: list[str] = []
    total = len(plan.migrations)
    current = ""

    def run(m: MigrationFile, migrator) -> None:
        nonlocal current
        current = m.name
        index = len(results) + len(skipped) + 1
        if progress:
            progress(ProgressEvent(plan.action, "start", m.name, index, total))
        result = _run_one(db, recorder, router, migrator, loaded[m.name], plan.action, actor,
                          run_id, approval)
        results.append(result)
        if progress:
            progress(ProgressEvent(plan.action, "done", m.name, index, total, result.seconds))

    migrator = None

    def prepare():
        # Bookkeeping tables are created in the first transaction, so that a first apply that
        # fails leaves no trace either. The applied files replay (sending nothing) only when a
        # migration first asks for their models (dbcore.migrate.replay).
        ensure_audit_table(db)
        router.model  # noqa: B018 - creates migratehistory
        migrator = router.migrator
        # the safe forms judge "an existing table" against the tables there before the batch
        migrator.safe = SafeForms(db, enabled=settings.safe_forms, store=StepStore(db, run_id).record)
        migrator.safe.on_plain = StepStore(db, run_id).mark_plain
        migrator.safe.begin_batch()
        return migrator

    try:
        if dry_run:
            # One transaction around everything, rolled back at the end.
            try:
                with db.atomic():
                    migrator = prepare()
                    for atomic, group in plan.phases:
                        if not atomic:
                            # Autocommit statements cannot be undone: a dry run does not run them.
                            skipped.append(group[0].name)
                            continue
                        for m in group:
                            run(m, migrator)
                    raise _DryRunRollback
            except _DryRunRollback:
                pass
        else:
            for atomic, group in plan.phases:
                if atomic:
                    with db.atomic():
                        xid = _xact_id(db)
                        migrator = migrator or prepare()
                        for m in group:
                            run(m, migrator)
                            if _xact_id(db) != xid:
                                raise TransactionBroken(
                                    f"migration {m.name}.py ended the batch transaction (COMMIT, "
                                    "ROLLBACK, database.commit() or database.transaction()): what "
                                    f"ran up to that point is committed, after {', '.join(committed) or 'nothing'}"
                                    f"; the database is NOT as before: remove the transaction "
                                    f"control from {m.name}.py, then roll back or restore by hand",
                                    committed=committed + [m.name])
                else:
                    if migrator is None:
                        with db.atomic():
                            migrator = prepare()
                    # Alone and outside any transaction: PostgreSQL refuses CREATE INDEX
                    # CONCURRENTLY in one. Its history row is written after it succeeded.
                    _run_alone(db, lambda m=group[0]: run(m, migrator), group[0], committed)
                committed.extend(x.name for x in group)
    except (TransactionBroken, NonAtomicFailed):
        raise
    except Exception as exc:
        done_names = [] if dry_run else committed
        raise _typed_failure(exc, current, plan.action, done_names, settings, target, router) from exc
    note = ""
    if skipped:
        note = f"not rehearsed (atomic = False, cannot be rolled back): {', '.join(skipped)}"
    steps = tuple(describe_steps(migrator.safe.steps)) if migrator is not None and migrator.safe else ()
    phase_line = ""
    if dry_run and steps:
        note = "; ".join(x for x in (note, "phases 2-4 not rehearsed in a dry run (they run after a commit)") if x)
    elif not dry_run and plan.action == "apply":
        # phases 2-4: the steps this batch wrote, and any an earlier run left pending
        phases = run_phases(db, settings, run_id=run_id, actor=actor, progress=phase_progress,
                            approval=approval)
        phase_line = phases.line()
    return RunReport(plan.action, plan.database, run_id, tuple(results), dry_run, note,
                     tuple(skipped), steps, phase_line)
