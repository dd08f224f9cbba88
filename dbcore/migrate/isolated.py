"""Migration code in a child process (dbcore.sandbox): loading the files, the apply, the rehearsal's runner.

The parent follows the child's progress, so that a child that dies (``os._exit``, a signal) or
runs past ``MIGRATE_APPLY_DEADLINE`` is reported naming the file it was running, with what the
migration history says was committed. At the deadline the parent ends the child's database
sessions itself (``pg_terminate_backend``) before killing it: the server rolls the batch back
at once instead of running the statement on.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import psycopg2

from dbcore.connection import Target, connect, raw_session
from dbcore.errors import ChildDeadline, ChildEnded, DbcoreError, MigrationFailed
from dbcore.migrate.history import read_applied
from dbcore.migrate.plan import Plan, Progress, ProgressEvent, RunReport
from dbcore.redact import error_line
from dbcore.sandbox import emit, run_in_child
from dbcore.settings import Settings

log = logging.getLogger(__name__)


def _forward_progress(event: ProgressEvent) -> None:
    """(In the child.) The progress callback: each event goes to the parent."""
    emit("progress", event)


def _forward_phase(event) -> None:
    """(In the child.) The phases' progress callback: each event goes to the parent."""
    emit("phase", event)


def _running(events: tuple) -> str:
    """Return the migration that had started but not finished when the child ended, or ""."""
    running = ""
    for kind, value in events:
        if kind == "progress":
            running = value.name if value.stage == "start" else ""
    return running


def _terminate(target: Target, events: tuple) -> None:
    """End the database sessions the child reported (at the deadline); failures are logged."""
    pids = sorted({v for k, v in events if k == "backend"})
    if not pids:
        return
    try:
        with raw_session(target, "dbmigrate deadline") as conn, conn.cursor() as cur:
            cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE pid = ANY(%s) AND datname = current_database()", (pids,))
    except (DbcoreError, psycopg2.Error) as exc:
        log.warning("could not end the sessions %s at the deadline: %s", pids,
                    error_line(exc, target.password))


def _committed(plan: Plan, target: Target) -> tuple[list[str], str]:
    """Return what the history says the plan committed, and how that reads ("" when nothing)."""
    try:
        db = connect(target, "dbmigrate check")
        try:
            applied = [a.name for a in read_applied(db)]
        finally:
            db.close()
    except Exception as exc:  # noqa: BLE001 - reported, never masking the failure
        return [], (f"; the history cannot be read ({error_line(exc, target.password)}): the database "
                    "may have changed: check `dbmigrate status`")
    before = set(plan.applied_before)
    if plan.action == "apply":
        done = [n for n in plan.names if n in applied and n not in before]
    else:
        done = [n for n in plan.names if n not in applied]
    if done:
        return done, f"; already committed before it: {', '.join(done)}"
    return [], "; nothing was changed (the whole batch was rolled back)"


def call_with_plan(func: Callable[..., Any], *args, plan: Plan, target: Target, settings: Settings,
                   env: dict[str, str] | None, progress: Progress | None = None, what: str = "",
                   **kwargs) -> Any:
    """Call ``func(*args, progress=..., **kwargs)`` in a child; a child that ends is MigrationFailed.

    ``env`` None is this process's own. ``func`` runs ``plan`` on ``target`` (the runner, or the
    rehearsal's part on the copy); its progress events reach ``progress`` here. The error names
    the migration that was running, why the child ended, and what the history says was committed.
    """

    phase_progress = kwargs.pop("phase_progress", None)
    if phase_progress is not None:  # the steps after the batch's commit (dbcore.migrate.phases)
        kwargs["phase_progress"] = _forward_phase

    def on_event(kind: str, value: Any) -> None:
        if kind == "progress" and progress is not None:
            progress(value)
        elif kind == "phase" and phase_progress is not None:
            phase_progress(value)

    try:
        return run_in_child(func, *args, env=env, what=what or f"the {plan.action}",
                            deadline=settings.apply_deadline, on_event=on_event,
                            on_deadline=lambda events: _terminate(target, events),
                            progress=_forward_progress, **kwargs)
    except ChildEnded as exc:
        name = _running(exc.events)
        committed, kept = _committed(plan, target)
        if isinstance(exc, ChildDeadline):
            where = f"{plan.action} of {name}" if name else f"the {plan.action}"
            raise MigrationFailed(
                f"{where} ran past MIGRATE_APPLY_DEADLINE={settings.apply_deadline:g}s and was stopped "
                f"(its sessions ended){kept}: find what waits in "
                f"{f'{name}.py' if name else 'the migration'}, or raise MIGRATE_APPLY_DEADLINE",
                committed=committed) from None
        function = "rollback()" if plan.action == "rollback" else "migrate()"
        if name:
            raise MigrationFailed(
                f"{plan.action} of {name} failed: the process running {function} of {name}.py "
                f"{exc.reason}{kept}: fix {function} in {name}.py and run again",
                committed=committed) from None
        raise MigrationFailed(f"{plan.action} failed: the process running it {exc.reason}{kept}",
                              committed=committed) from None


def _execute(plan: Plan, target: Target, settings: Settings, **kwargs) -> RunReport:
    """(In the child.) The runner itself."""
    from dbcore.migrate.runner import execute

    return execute(plan, target, settings, **kwargs)


def execute_isolated(plan: Plan, target: Target, settings: Settings, *,
                     progress: Progress | None = None, **kwargs) -> RunReport:
    """Run :func:`dbcore.migrate.runner.execute` in a child with this process's environment.

    The same arguments and result; a child that exits, is killed or runs past the deadline is
    a MigrationFailed naming the file.
    """
    if plan.empty:  # nothing to run: no child
        from dbcore.migrate.runner import execute

        return execute(plan, target, settings, **kwargs)
    return call_with_plan(_execute, plan, target, settings, plan=plan, target=target,
                          settings=settings, env=None, progress=progress, **kwargs)
