"""Plan first: what an apply or rollback will do, decided and returned as data.

``plan_apply`` and ``plan_rollback`` read the folder and the history and return a :class:`Plan`;
``dbcore.migrate.runner`` executes it. The report types of a run live here too, so that callers
that only read plans and reports need not import the runner.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import peewee

from dbcore.connection import Target, connect
from dbcore.errors import (
    ConfigError,
    MigrationFileError,
    NothingToRollback,
    PlanOutdated,
    RollbackRefused,
)
from dbcore.lint.syntax import rollback_gap
from dbcore.migrate.files import MigrationFile, discover, folder_inputs, load_checked, review_env
from dbcore.migrate.history import read_applied
from dbcore.migrate.phases import pending_steps
from dbcore.settings import Settings

Action = Literal["apply", "rollback"]
Stage = Literal["start", "done"]


@dataclass(frozen=True)
class ProgressEvent:
    """Reported to a progress callback before and after each migration."""

    action: Action
    stage: Stage
    name: str
    index: int  # 1-based
    total: int
    seconds: float = 0.0


Progress = Callable[[ProgressEvent], None]

#: What a phase of an apply is (docs/migrations.md, "Phases of an apply"): "batch", consecutive
#: migrations in one transaction; "alone", one ``atomic = False`` migration in autocommit, after
#: the phase before it committed. Later kinds (index builds, backfills, validation) add here.
PhaseKind = Literal["batch", "alone"]


@dataclass(frozen=True)
class Phase:
    """A part of an apply that commits on its own; phases run in order, each after the last committed."""

    kind: PhaseKind
    migrations: tuple[MigrationFile, ...]

    @property
    def atomic(self) -> bool:
        """True when the phase runs in one transaction (all or nothing)."""
        return self.kind == "batch"

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.migrations]


def split_phases(migrations: tuple[MigrationFile, ...]) -> tuple[Phase, ...]:
    """Group consecutive atomic migrations into one batch; each ``atomic = False`` one alone."""
    phases: list[Phase] = []
    for m in migrations:
        if m.atomic and phases and phases[-1].kind == "batch":
            phases[-1] = Phase("batch", phases[-1].migrations + (m,))
        else:
            phases.append(Phase("batch" if m.atomic else "alone", (m,)))
    return tuple(phases)


@dataclass(frozen=True)
class Plan:
    """What an apply or rollback will do: the migrations in order, split into phases (:attr:`phases`)."""

    action: Action
    database: str  # masked URL
    applied_before: tuple[str, ...]
    migrations: tuple[MigrationFile, ...]
    dbname: str = ""  # the database's name, as the approver reads it
    #: (path, sha256) of every file the plan may read: the whole migrations folder (data files
    #: such as sql/006_up.sql, helpers) and a checks folder beside it (:func:`folder_inputs`)
    inputs: tuple[tuple[str, str], ...] = ()
    #: steps an earlier apply left for its phases 2-4 (dbcore.migrate.phases): this apply continues them
    steps_pending: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.migrations]

    @property
    def empty(self) -> bool:
        return not self.migrations and not self.steps_pending

    @property
    def phases(self) -> tuple[Phase, ...]:
        """The phases the runner executes in order (:func:`split_phases`)."""
        return split_phases(self.migrations)

    def to_dict(self) -> dict:
        return {
            "action": self.action, "database": self.database,
            "applied_before": list(self.applied_before),
            "migrations": [{"name": m.name, "sha256": m.sha256, "atomic": m.atomic}
                           for m in self.migrations],
            "transactions": len(self.phases),
            "steps_pending": list(self.steps_pending),
        }


@dataclass(frozen=True)
class MigrationResult:
    """One migration as it ran: how long it took and the SQL it sent."""

    name: str
    seconds: float
    sql: tuple[str, ...] = ()
    atomic: bool = True
    #: each statement's line in the migration file (of the migrator call that queued it); None
    #: for the product's own statements (its history, peewee's introspection)
    lines: tuple[int | None, ...] = ()


@dataclass(frozen=True)
class RunReport:
    """What an apply or rollback did."""

    action: Action
    database: str
    run_id: str
    results: tuple[MigrationResult, ...] = ()
    dry_run: bool = False
    note: str = ""
    skipped: tuple[str, ...] = field(default=())
    #: the work moved after the batch's commit, with its SQL, by phase (dbcore.migrate.phases)
    steps: tuple[str, ...] = field(default=())
    #: which phase the run reached, when it had work after the batch
    phase_line: str = ""
    #: how long each step after the batch took (on a rehearsal copy: what to expect live)
    phase_timings: tuple[str, ...] = field(default=())

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.results]

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: what happened (and which phase the run reached, when it had phases)."""
        if not self.results:
            if self.phase_line:
                return f"continued an earlier apply: {self.phase_line}"
            return self.note or ("up to date" if self.action == "apply" else "nothing rolled back")
        verb = "applied" if self.action == "apply" else "rolled back"
        if self.dry_run:
            verb = f"rehearsed (rolled back) {self.action} of"
        total = sum(r.seconds for r in self.results)
        line = f"{verb} {len(self.results)} migration(s) in {total:.2f}s: {', '.join(self.names)}"
        return f"{line}; {self.phase_line}" if self.phase_line else line


def read_state(target: Target, settings: Settings, db: peewee.Database | None = None):
    """Return the migration files on disk and the names recorded as applied, in order."""
    own = db is None
    db = db or connect(target)
    try:
        return discover(settings.migrations_dir), [a.name for a in read_applied(db)]
    finally:
        if own:
            db.close()


def pending_files(files: list[MigrationFile], applied: list[str], upto: str | None) -> list[MigrationFile]:
    """Return the files not yet applied, in order, up to and including ``upto`` when given."""
    done = set(applied)
    pending = [f for f in files if f.name not in done]
    if upto is None:
        return pending
    names = [f.name for f in files]
    match = [n for n in names if n == upto or n.startswith(upto + "_") or n[:3] == upto]
    if not match:
        raise MigrationFileError(f"no migration named {upto!r} in {files[0].path.parent if files else 'the folder'}: "
                                 "pass a name from `dbmigrate status`")
    upto_name = match[0]
    if upto_name in done:
        return []
    cut = [f.name for f in pending].index(upto_name) + 1
    return pending[:cut]


def plan_apply(target: Target, settings: Settings, *, upto: str | None = None,
               db: peewee.Database | None = None) -> Plan:
    """Return the plan of pending migrations (up to ``upto``), every file compiled and checked."""
    files, applied = read_state(target, settings, db)
    pending = pending_files(files, applied, upto)
    # fail now, naming the file, rather than after earlier ones ran; in a child process whose
    # environment names no database: the files are code under review (dbcore.sandbox)
    load_checked(pending, review_env(*settings.secrets(), target.password), settings.apply_deadline)
    own = db is None
    db = db or connect(target)
    try:
        left = tuple(f"phase {s.phase} of {s.migration}: {s.kind} {s.name} on {s.table}"
                     for s in pending_steps(db))
    finally:
        if own:
            db.close()
    return Plan("apply", target.masked_url, tuple(applied), tuple(pending), target.dbname,
                folder_inputs(settings.migrations_dir), left)


def undone_by_nothing(plan: Plan) -> list[tuple[str, str]]:
    """Return (name, "missing" or "empty") for each migration of a rollback plan whose rollback()
    cannot undo what its migrate() did."""
    gaps = [(m.name, rollback_gap(m.path.read_text(encoding="utf-8"))) for m in plan.migrations]
    return [(name, why) for name, why in gaps if why]


def left_behind(gaps: list[tuple[str, str]]) -> str:
    """Return the sentence of what a forced rollback of ``gaps`` leaves in the database."""
    names = ", ".join(f"{n}.py" for n, _ in gaps)
    return (f"rollback() of {names} undoes nothing: what its migrate() made (tables, columns, "
            "types, indexes) stays in the database while the history says it is pending, so the "
            "next apply runs it again over them")


def plan_rollback(target: Target, settings: Settings, *, count: int = 1,
                  names: list[str] | None = None, db: peewee.Database | None = None,
                  force: bool = False) -> Plan:
    """Return the plan of rolling back the newest ``count`` applied migrations (or exactly ``names``).

    Raises RollbackRefused, before anything runs, when a migration's rollback() is missing or
    empty while its migrate() changed the schema, unless ``force`` (see :func:`left_behind`).
    """
    files, applied = read_state(target, settings, db)
    if names is not None:
        count = len(names)
    if count < 1:
        raise ConfigError("--count must be 1 or more")
    if count > len(applied):
        raise NothingToRollback(
            f"cannot roll back {count}: only {len(applied)} migration(s) applied on {target.dbname!r}")
    chosen = list(reversed(applied[-count:]))
    if names is not None and sorted(names) != sorted(chosen):
        raise PlanOutdated(
            f"{', '.join(names)} are not the newest applied migrations ({', '.join(chosen)}): "
            "roll back newest first")
    by_name = {f.name: f for f in files}
    missing = [n for n in chosen if n not in by_name]
    if missing:
        raise MigrationFileError(
            f"cannot roll back {', '.join(missing)}: the file is missing from "
            f"{settings.migrations_dir}: restore it from version control")
    # fail now, naming the file, rather than after newer ones were undone (in a child: dbcore.sandbox)
    load_checked([by_name[n] for n in chosen], review_env(*settings.secrets(), target.password),
                 settings.apply_deadline)
    plan = Plan("rollback", target.masked_url, tuple(applied), tuple(by_name[n] for n in chosen),
                target.dbname, folder_inputs(settings.migrations_dir))
    gaps = undone_by_nothing(plan)
    if gaps and not force:
        what = "; ".join(f"{n}.py has {'no' if why == 'missing' else 'an empty'} rollback() while its "
                         "migrate() changes the schema" for n, why in gaps)
        raise RollbackRefused(f"cannot roll back, nothing was changed: {what}: write its rollback(), "
                              "or restore a backup (--force rolls back the history only: what "
                              "migrate() made stays)")
    return plan
