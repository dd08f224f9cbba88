"""Execute a plan (an apply or a rollback) under the migration lock, phase by phase.

``plan_apply`` and ``plan_rollback`` (dbcore.migrate.plan) decide and return data; :func:`execute`
acts on that data, the way django's executor does: check the plan is still current, run each of
its phases (:attr:`Plan.phases`), record each migration, report. A "batch" phase runs its
migrations in ONE transaction (peewee-migrate's per-migration transactions become savepoints), so
a failure in it leaves the database as it was before the phase. An "alone" phase is one migration
declaring ``atomic = False`` (CREATE INDEX CONCURRENTLY), run in autocommit after the phase before
it committed. docs/migrations.md ("Phases of an apply") states what each phase promises.

Seams for other modules: a :class:`~dbcore.migrate.observe.RunObserver` passed to :func:`execute`
is told when a phase starts, before and after each statement a migration sends, and right before
each COMMIT; a new kind of phase is one function in ``_PHASE_RUNNERS``.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import peewee
import psycopg2

from dbcore.checks.post import check_no_invalid_indexes
from dbcore.connection import Target, connect
from dbcore.errors import (
    MigrationFailed,
    MigrationFileError,
    NonAtomicFailed,
    PlanOutdated,
    SqlDiffers,
    TableLockTimeout,
    TransactionBroken,
)
from dbcore.migrate.files import LoadedMigration, MigrationFile, load
from dbcore.migrate.history import ApprovalRecord, default_actor, ensure_audit_table, record_audit
from dbcore.migrate.locking import configure_session, migration_lock
from dbcore.migrate.observe import Observers, RunObserver, SqlRecorder
from dbcore.migrate.phases import PhaseProgress, StepStore, cancel_steps, describe_steps, run_phases
from dbcore.migrate.plan import (
    Action,
    MigrationResult,
    Phase,
    Plan,
    Progress,
    ProgressEvent,
    RunReport,
    Stage,
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


@dataclass
class _Run:
    """One execution of a plan under way: what the small functions below share (no closures)."""

    plan: Plan
    db: peewee.Database
    target: Target
    settings: Settings
    actor: str
    run_id: str
    dry_run: bool
    approval: ApprovalRecord | None
    progress: Progress | None
    observer: RunObserver
    recorder: SqlRecorder
    router: FileRouter
    loaded: dict[str, LoadedMigration]
    results: list[MigrationResult] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    current: str = ""  # the migration running, named by the error if it fails
    migrator: Any = None
    phase_progress: PhaseProgress | None = None
    phase_line: str = ""  # which of the phases after the batch the run reached
    phase_timings: tuple[str, ...] = ()

    def report(self) -> RunReport:
        note = ""
        if self.skipped:
            note = f"not rehearsed (atomic = False, cannot be rolled back): {', '.join(self.skipped)}"
        safe = self.migrator.safe if self.migrator is not None else None
        steps = tuple(describe_steps(safe.steps)) if safe is not None else ()
        if self.dry_run and safe is not None and safe.pending():
            note = "; ".join(x for x in (note, "phases 2-4 are not rehearsed by a dry run: they run "
                                               "after a commit") if x)
        return RunReport(self.plan.action, self.plan.database, self.run_id, tuple(self.results),
                         self.dry_run, note, tuple(self.skipped), steps, self.phase_line,
                         self.phase_timings)


def execute(plan: Plan, target: Target, settings: Settings, *, actor: str | None = None,
            run_id: str | None = None, dry_run: bool = False, progress: Progress | None = None,
            approval: ApprovalRecord | None = None,
            observers: Sequence[RunObserver] = (), phase_progress: PhaseProgress | None = None) -> RunReport:
    """Run ``plan`` (an apply or a rollback) under the migration lock, phase by phase.

    ``approval`` (who approved, why, the plan's fingerprint) goes into every audit row;
    ``observers`` are told each phase, statement and commit. A dry run runs the batches in one
    transaction rolled back at the end and skips the "alone" phases. Raises MigrationFailed (or a
    subclass) carrying what was committed; PlanOutdated when the history or a file changed since
    the plan was made.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    actor = default_actor(actor or settings.actor)
    if plan.empty:
        return RunReport(plan.action, plan.database, run_id, note="up to date")
    with migration_lock(target, settings, f"{plan.action} by {actor}"), \
            _session(target, f"dbmigrate {plan.action} by {actor}") as db:
        if _applied_meanwhile(plan, target, settings, db):
            return RunReport(plan.action, plan.database, run_id,
                             note="up to date (another run applied these meanwhile)")
        configure_session(db, settings)
        observer = Observers(observers)
        run = _Run(plan, db, target, settings, actor, run_id, dry_run, approval, progress, observer,
                   SqlRecorder(db, observer), FileRouter(db, settings.migrations_dir),
                   {m.name: load(m) for m in plan.migrations})
        run.phase_progress = phase_progress
        _run_phases(run)
        _after_commit(run)
        return run.report()


def _after_commit(run: _Run) -> None:
    """Phases 2-4 (dbcore.migrate.phases): the steps this apply wrote, and any an earlier one left.

    Outside any transaction, after every batch committed (a rollback's too: its ``drop_index``
    runs as ``DROP INDEX CONCURRENTLY`` there); a dry run runs none.
    """
    if run.dry_run:
        return
    report = run_phases(run.db, run.settings, run_id=run.run_id, actor=run.actor,
                        progress=run.phase_progress, approval=run.approval)
    run.phase_line = report.line()
    run.phase_timings = tuple(report.timings)


@contextmanager
def _session(target: Target, application_name: str) -> Iterator[peewee.Database]:
    """The run's own connection (beside the lock's), named for pg_stat_activity."""
    db = connect(target, application_name=application_name[:63])
    try:
        yield db
    finally:
        db.close()


def _applied_meanwhile(plan: Plan, target: Target, settings: Settings, db: peewee.Database) -> bool:
    """Check the plan is current under the lock (the history is final there).

    Returns True when another run applied exactly these meanwhile (nothing to do); raises
    PlanOutdated when the history or a file changed since the plan was made.
    """
    files, applied = read_state(target, settings, db)
    if tuple(applied) != plan.applied_before:
        if plan.action == "apply" and set(plan.names) <= set(applied):
            return True
        raise PlanOutdated(
            f"the migration history of {target.dbname!r} changed since the plan was made: "
            "plan again and review it")
    current_files = {f.name: f.sha256 for f in files}
    for m in plan.migrations:
        if current_files.get(m.name) != m.sha256:
            raise PlanOutdated(
                f"migration {m.path.name} changed on disk since the plan was made: "
                "plan again and review it")
    return False


def _run_phases(run: _Run) -> None:
    """Run every phase in order (a dry run: inside one transaction rolled back); type any failure."""
    try:
        with _rolled_back(run.db) if run.dry_run else nullcontext():
            for phase in run.plan.phases:
                _PHASE_RUNNERS[phase.kind](run, phase)
                if not run.dry_run:
                    run.committed.extend(phase.names)
                run.observer.phase_done(phase, _results_of(run, phase))
    except (TransactionBroken, NonAtomicFailed, SqlDiffers):  # their messages say it all
        raise
    except Exception as exc:
        committed = [] if run.dry_run else run.committed
        raise _typed_failure(exc, run.current, run.plan.action, committed, run.settings,
                             run.target, run.router) from exc


def _run_batch(run: _Run, phase: Phase) -> None:
    """Run a batch phase: its migrations in one transaction (a savepoint in a dry run), then commit."""
    with run.db.atomic():
        xid = _xact_id(run.db)
        _prepare(run)
        run.observer.phase_started(phase, run.db)
        for m in phase.migrations:
            _run_one(run, phase, m)
            _check_same_transaction(run, m, xid)
        run.observer.before_commit(phase, _results_of(run, phase), run.db)


def _run_alone(run: _Run, phase: Phase) -> None:
    """Run an "alone" phase: its ``atomic = False`` migration in autocommit (a dry run skips it)."""
    m = phase.migrations[0]
    if run.dry_run:  # autocommit statements cannot be undone
        run.skipped.append(m.name)
        return
    if run.migrator is None:
        with run.db.atomic():
            _prepare(run)
    run.observer.phase_started(phase, run.db)
    # Outside any transaction: PostgreSQL refuses CREATE INDEX CONCURRENTLY in one. Its history
    # row is written after it succeeded.
    _autocommit_checked(run.db, lambda: _run_one(run, phase, m), m, run.committed)


#: how each kind of phase runs (dbcore.migrate.plan.PhaseKind)
_PHASE_RUNNERS: dict[str, Callable[[_Run, Phase], None]] = {"batch": _run_batch, "alone": _run_alone}


def _prepare(run: _Run) -> None:
    """Create the bookkeeping tables and the migrator, once, in the transaction open around it.

    In the first transaction, so that a first apply that fails leaves no trace either. The applied
    files replay (sending nothing) only when a migration first asks for their models
    (dbcore.migrate.replay).
    """
    if run.migrator is None:
        ensure_audit_table(run.db)
        run.router.model  # noqa: B018 - creates migratehistory
        run.migrator = run.router.migrator
        # safe forms (dbcore.migrate.safe_forms) for the tables there before the batch; the work
        # they move after the commit is written in this transaction (dbcore.migrate.phases)
        store = StepStore(run.db, run.run_id)
        run.migrator.safe = SafeForms(run.db, enabled=run.settings.safe_forms, store=store.record)
        run.migrator.safe.on_plain = store.mark_plain
        run.migrator.safe.begin_batch()


def _run_one(run: _Run, phase: Phase, m: MigrationFile) -> None:
    """Run one migration of ``phase``, record it (history and audit) and report its progress."""
    run.current = m.name
    index = len(run.results) + len(run.skipped) + 1
    _tell(run, "start", m.name, index)
    result = _send(run, phase, run.loaded[m.name])
    _record(run, run.loaded[m.name].file, result.seconds)
    run.results.append(result)
    _tell(run, "done", m.name, index, result.seconds)


def _send(run: _Run, phase: Phase, loaded: LoadedMigration) -> MigrationResult:
    """Run the migration's migrate() (or rollback()) and flush its queued operations, recording the SQL."""
    started = time.monotonic()
    run.migrator.safe.begin_file(loaded.file.name, loaded.scope)
    if run.plan.action == "rollback":  # what is left of its phases would act on what it undoes
        cancel_steps(run.db, [loaded.file.name])
    # each statement's line: the migrator call in the file that queued it (dbcore.migrate.compat)
    with run.recorder.recording(loaded.file.name, phase, run.migrator.call_site) as statements, \
            run.migrator.running(loaded.file.path):
        if run.plan.action == "apply":
            loaded.migrate(run.migrator, run.db, fake=False)
        elif loaded.rollback is not None:  # none: a forced rollback of the history only
            loaded.rollback(run.migrator, run.db, fake=False)
        run.migrator.flush()  # queued operations are sent now
    seconds = time.monotonic() - started
    return MigrationResult(loaded.file.name, seconds, tuple(statements), loaded.file.atomic,
                           tuple(run.recorder.lines))


def _record(run: _Run, m: MigrationFile, seconds: float) -> None:
    """Write the migration's history row (or delete it, for a rollback) and its audit row."""
    history = run.router.model
    if run.plan.action == "apply":
        history.create(name=m.name)
    else:
        history.delete().where(history.name == m.name).execute()
    record_audit(run.db, name=m.name, action=run.plan.action, checksum=m.sha256, actor=run.actor,
                 run_id=run.run_id, duration_ms=int(seconds * 1000), approval=run.approval)
    log.info("%s %s in %.2fs", run.plan.action, m.name, seconds)


def _tell(run: _Run, stage: Stage, name: str, index: int, seconds: float = 0.0) -> None:
    if run.progress:
        run.progress(ProgressEvent(run.plan.action, stage, name, index, len(run.plan.migrations),
                                   seconds))


def _check_same_transaction(run: _Run, m: MigrationFile, xid: str) -> None:
    """Raise TransactionBroken if migration ``m`` ended the transaction it ran in."""
    if _xact_id(run.db) == xid:
        return
    raise TransactionBroken(
        f"migration {m.name}.py ended the batch transaction (COMMIT, ROLLBACK, database.commit() "
        "or database.transaction()): what ran up to that point is committed, after "
        f"{', '.join(run.committed) or 'nothing'}; the database is NOT as before: remove the "
        f"transaction control from {m.name}.py, then roll back or restore by hand",
        committed=run.committed + [m.name])


def _results_of(run: _Run, phase: Phase) -> list[MigrationResult]:
    names = set(phase.names)
    return [r for r in run.results if r.name in names]


def _xact_id(db: peewee.Database) -> str:
    """Return the current transaction's id (assigning one): it changes if a migration commits."""
    return str(db.execute_sql("SELECT pg_current_xact_id()").fetchone()[0])


def _autocommit_checked(db: peewee.Database, run: Callable[[], object], m: MigrationFile,
                        committed: list[str]) -> None:
    """Call ``run`` (an ``atomic = False`` migration); raise NonAtomicFailed if it fails or leaves an INVALID index."""
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
    """Raised inside the transaction around a dry run to roll it back."""


@contextmanager
def _rolled_back(db: peewee.Database) -> Iterator[None]:
    """Run the block in one transaction rolled back at its end (its batches become savepoints)."""
    try:
        with db.atomic():
            yield
            raise _DryRunRollback
    except _DryRunRollback:
        pass


def _pgcode(exc: BaseException | None) -> str | None:
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
    if _connection_lost(exc, code):  # the server stopped or the network dropped: not the file's fault
        return MigrationFailed(
            f"{action} of {name} failed: the connection to the database server {target.server} "
            f"was lost ({detail}){kept}: check that the server is running and reachable, then run "
            "again (`dbmigrate status` shows what is applied)", committed=committed)
    where = "rollback()" if action == "rollback" else "migrate()"
    return MigrationFailed(f"{action} of {name} failed: {type(exc).__name__}: {detail}{kept}: "
                           f"fix {where} in {name}.py and run again", committed=committed)


#: SQLSTATEs of a server going away: admin_shutdown, crash_shutdown, cannot_connect_now
_SERVER_GONE = {"57P01", "57P02", "57P03"}
_CONNECTION_LOST = re.compile(r"server closed the connection|connection already closed|terminating "
                              r"connection|could not receive data|no connection to the server|"
                              r"SSL connection has been closed|connection not open", re.IGNORECASE)


def _connection_lost(exc: BaseException, code: str | None) -> bool:
    """Return whether ``exc`` says the connection to the server was lost (not a SQL error)."""
    if code and (code.startswith("08") or code in _SERVER_GONE):
        return True
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (psycopg2.OperationalError, psycopg2.InterfaceError,
                                peewee.OperationalError, peewee.InterfaceError)) \
                and not code and _CONNECTION_LOST.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False
