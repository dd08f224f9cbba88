"""``dbmigrate status | new | apply | rollback | plan``: the migration sub-commands."""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from dbcore.cli.context import Context, positive_int
from dbcore.connection import Env, connect
from dbcore.deploy.plan import DeployPlan, plan_and_lint
from dbcore.errors import ConfigError, LintStopped
from dbcore.migrate.files import new_migration, status
from dbcore.migrate.isolated import execute_isolated as execute  # migration code in a child
from dbcore.migrate.phases import PhaseEvent, step_summary
from dbcore.migrate.plan import (
    Plan,
    ProgressEvent,
    RunReport,
    left_behind,
    plan_rollback,
    undone_by_nothing,
)
from dbcore.migrate.retry import apply_retrying


def _print_progress(event: ProgressEvent) -> None:
    """Show each migration as it starts and ends, on stderr (stdout stays for results)."""
    verb = "applying" if event.action == "apply" else "rolling back"
    if event.stage == "start":
        print(f"[{event.index}/{event.total}] {verb} {event.name} ...", file=sys.stderr, flush=True)
    else:
        print(f"[{event.index}/{event.total}] {event.name} done in {event.seconds:.2f}s",
              file=sys.stderr, flush=True)


def _print_phase(event: PhaseEvent) -> None:
    """Show the steps after the batch's commit (index builds, backfills, validation) on stderr."""
    print(f"[phase {event.phase}] {event.step}: {event.message}", file=sys.stderr, flush=True)


def _render_plan(plan: Plan) -> str:
    if plan.empty:
        return f"{plan.database}: nothing to {plan.action}"
    lines = [f"{plan.database}: {plan.action} {len(plan.migrations)} migration(s) "
             f"in {len(plan.phases)} transaction(s):"]
    for number, phase in enumerate(plan.phases, 1):
        kind = "one transaction" if phase.atomic else "autocommit, alone (atomic = False)"
        lines.append(f"  transaction {number} ({kind}):")
        lines += [f"    {m.name}" for m in phase.migrations]
    if plan.steps_pending:
        lines.append("  then continue what an earlier apply left after its batch's commit:")
        lines += [f"    {s}" for s in plan.steps_pending]
    return "\n".join(lines)


def _emit(report: RunReport, as_json: bool, show_sql: bool = False) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), default=str, indent=2))
        return
    if show_sql:
        for result in report.results:
            print(f"-- {result.name} ({result.seconds:.2f}s)")
            for statement in result.sql:
                print(statement.rstrip(";") + ";")
        if report.steps:
            print("-- after the batch's commit (safe forms, backfills), by phase:")
            print("\n".join(f"-- {line}" for line in report.steps))
    print(report.summary())
    if report.note and report.results:
        print(report.note)


def cmd_status(ctx: Context) -> int:
    """Print every migration with its state."""
    db = connect(ctx.target)
    try:
        rows = status(db, ctx.settings.migrations_dir)
        steps = step_summary(db)
    finally:
        db.close()
    if ctx.args.json:  # each migration with the steps after its committed batch not done yet
        print(json.dumps([{**r.to_dict(), "steps_left": [s for s in steps if s["migration"] == r.name]}
                          for r in rows], indent=2, default=str))
        return 0
    print(f"{ctx.target.masked_url} ({ctx.target.env})")
    for r in rows:
        when = r.applied_at.strftime("%Y-%m-%d %H:%M:%S UTC") if r.applied_at else ""
        state = "applied" if r.applied else "pending"
        flag = ""
        if r.error:
            flag = f"  BROKEN: {r.error}"
        elif r.file_missing:
            flag = "  FILE MISSING"
        elif r.changed:
            flag = "  CHANGED since applied"
        elif r.applied and r.recorded_checksum is None:
            flag = "  no checksum known yet"
        print(f"  {state:8} {when:23}  {r.name}{flag}")
    unknown = [r.name for r in rows if r.applied and not r.file_missing and r.recorded_checksum is None]
    if unknown:
        print(f"{len(unknown)} applied migration(s) have no checksum known yet (applied by pw_migrate "
              f"or before dbmigrate): an edit to them cannot be detected; `dbmigrate baseline "
              f"{unknown[-1][:3]}` records their checksums as the files are now")
    pending = sum(not r.applied for r in rows)
    for step in steps:
        error = f"; last error: {step['error']}" if step["error"] else ""
        print(f"  phase {step['phase']} left by run {step['run_id']} ({step['state']}, "
              f"{step['attempts']} attempt(s)): {step['migration']}: {step['kind']} {step['name']} "
              f"on {step['table']}{error}")
    if steps:
        print(f"{len(steps)} step(s) after a committed batch not done: `dbmigrate apply` continues them")
    print(f"{pending} pending" if pending else ("up to date" if not steps else "no migration pending"))
    return 0


def cmd_baseline(ctx: Context) -> int:
    """Mark every migration up to NNN as applied without running it; record their checksums."""
    from dbcore.deploy.policy import baseline_guarded  # the live-target policy

    report = baseline_guarded(ctx.target, ctx.settings, ctx.args.upto, actor=ctx.args.actor,
                              run_id=ctx.args.run_id)
    print(f"{report.database}: {report.summary()}")
    return 0


def cmd_new(ctx: Context) -> int:
    """Write the next NNN_name.py."""
    path = new_migration(ctx.settings.migrations_dir, " ".join(ctx.args.name))
    print(path)
    return 0


def _refuse_live_dry_run(ctx: Context) -> None:
    """A dry run takes the apply's locks for real: outside local it needs an explicit --on-live."""
    if ctx.target.env is not Env.LOCAL and not ctx.args.on_live:
        raise ConfigError(
            f"a dry run on the {ctx.target.env} database takes the same table locks as the apply "
            "(only the changes are rolled back): rehearse on a copy with `python flows/migrate.py "
            f"--env {ctx.target.env} --dry-run`, or pass --on-live to accept the locks")


def cmd_plan(ctx: Context) -> int:
    """Print what apply would do; --sql rehearses it in a rolled-back transaction."""
    if ctx.args.sql:
        _refuse_live_dry_run(ctx)
    plan, lint_report = plan_and_lint(ctx.target, ctx.settings, upto=ctx.args.target,
                                      allow_destructive=ctx.args.allow_destructive)
    deploy = DeployPlan(str(ctx.target.env), plan, lint_report)
    if ctx.args.json and not ctx.args.sql:
        print(json.dumps(deploy.to_dict(), indent=2, default=str))
        return 0 if deploy.lint.ok else 1
    if not ctx.args.json:
        print(_render_plan(plan) if plan.empty else deploy.text())
    if ctx.args.sql and not plan.empty:
        report = execute(plan, ctx.target, ctx.settings, dry_run=True,
                            progress=_print_progress)
        _emit(report, ctx.args.json, show_sql=True)
    return 0 if deploy.lint.ok else 1


def _backed_up(info) -> None:
    print(f"backup before the change (verified): {info.key} ({info.size} bytes, sha256 {info.sha256[:16]}...)",
          file=sys.stderr, flush=True)


def _run(ctx: Context, plan: Plan) -> int:
    """Show the plan, run it with progress on stderr, print what happened.

    An apply or a rollback obeys the live-target policy: on production or proxy --actor names who
    approves the printed plan, and a verified backup is taken right before it (a dry run changes
    nothing, needs neither).
    """
    if ctx.args.dry_run:
        _refuse_live_dry_run(ctx)
    quiet = ctx.args.json
    if not quiet:
        print(_render_plan(plan), file=sys.stderr)
    # an apply rolled back at lock_timeout is tried again with backoff (a dry run is not)
    run = apply_retrying if plan.action == "apply" and not ctx.args.dry_run else execute
    run = partial(run, phase_progress=None if quiet else _print_phase)
    from dbcore.deploy.policy import apply_guarded  # it brings the backup's S3 client: only here

    run = partial(apply_guarded, backed_up=_backed_up, run=run)
    settings = ctx.settings
    if getattr(ctx.args, "no_safe_forms", False):
        settings = settings.model_copy(update={"safe_forms": False})
    report = run(plan, ctx.target, settings, dry_run=ctx.args.dry_run,
                 actor=ctx.args.actor, run_id=ctx.args.run_id,
                 progress=None if quiet else _print_progress)
    _emit(report, quiet, show_sql=ctx.args.dry_run and not quiet)
    return 0


def cmd_apply(ctx: Context) -> int:
    """Lint the pending migrations as the flow does, then apply them in one transaction under the lock."""
    plan, report = plan_and_lint(ctx.target, ctx.settings, upto=ctx.args.target,
                                 allow_destructive=ctx.args.allow_destructive)
    if report.findings and not ctx.args.json:
        print(report.text(), file=sys.stderr)
    if not report.ok and ctx.args.ignore_lint_errors:
        print(f"dbmigrate: warning: --ignore-lint-errors: applying despite {report.summary()}",
              file=sys.stderr)
    elif not report.ok:
        raise LintStopped(f"lint: {report.summary()}, nothing was applied: {report.errors[0].text()} "
                          "(fix it, or allow it knowingly: docs/lint-rules.md)")
    return _run(ctx, plan)


def cmd_rollback(ctx: Context) -> int:
    """Roll back the newest N applied migrations in one transaction (--force: see left_behind)."""
    plan = plan_rollback(ctx.target, ctx.settings, count=ctx.args.count, force=ctx.args.force)
    gaps = undone_by_nothing(plan)
    if gaps:
        print(f"dbmigrate: warning: --force: {left_behind(gaps)}", file=sys.stderr)
    return _run(ctx, plan)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the migration sub-commands to ``dbmigrate``."""
    p = sub.add_parser("status", parents=[common], help="list migrations: applied, pending, changed")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=cmd_status)

    p = sub.add_parser("baseline", parents=[common],
                       help="adopt a database: mark migrations up to NNN applied without running them",
                       description="Record every migration up to NNN as applied without running "
                                   "it (a schema made outside migrations), and the checksum of "
                                   "each (a history pw_migrate wrote); audited in migration_audit.")
    p.add_argument("upto", metavar="NNN", help="the last migration the database already has (name or number)")
    p.add_argument("--actor", help="who to record in migration_audit (default: OS user); on "
                                   "production or proxy it is required: who approves the baseline")
    p.add_argument("--run-id", help="an id to record in migration_audit")
    p.set_defaults(handler=cmd_baseline)

    p = sub.add_parser("new", parents=[common], help="write the next NNN_name.py from the template")
    p.add_argument("name", nargs="+", help='what it does, e.g. "add user email"')
    p.set_defaults(handler=cmd_new)

    p = sub.add_parser("plan", parents=[common], help="show what apply would do, changing nothing")
    p.add_argument("--target", help="stop after this migration (name or number)")
    p.add_argument("--sql", action="store_true",
                   help="rehearse in a transaction that is rolled back, and print the SQL")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--on-live", action="store_true",
                   help="allow --sql outside local (it takes the apply's table locks)")
    p.add_argument("--allow-destructive", action="store_true",
                   help="allow migrations that drop tables or columns (as the flow's flag)")
    p.set_defaults(handler=cmd_plan)

    for name, helptext in (("apply", "apply pending migrations in one transaction"),
                           ("rollback", "roll back the newest applied migrations in one transaction")):
        p = sub.add_parser(name, parents=[common], help=helptext)
        if name == "apply":
            p.add_argument("--target", help="stop after this migration (name or number)")
            p.add_argument("--allow-destructive", action="store_true",
                           help="allow migrations that drop tables or columns (as the flow's flag)")
            p.add_argument("--ignore-lint-errors", action="store_true",
                           help="apply even with lint errors, printed first (e.g. a new development "
                                "database built from a history other databases already ran)")
            p.set_defaults(handler=cmd_apply)
        else:
            p.add_argument("--count", type=positive_int, default=1, help="how many (default 1)")
            p.add_argument("--force", action="store_true",
                           help="roll back even a migration whose rollback() is missing or empty: "
                                "only its history row goes, what its migrate() made stays")
            p.set_defaults(handler=cmd_rollback)
        p.add_argument("--dry-run", action="store_true",
                       help="run inside a transaction that is rolled back; print the SQL "
                            "(it takes the same table locks: local only unless --on-live)")
        p.add_argument("--on-live", action="store_true",
                       help="allow --dry-run outside local")
        p.add_argument("--actor", help="who to record in migration_audit (default: OS user); "
                                       f"{name} on production or proxy needs it: the approver")
        p.add_argument("--run-id", help="an id to record in migration_audit (a CI job, a ticket)")
        p.add_argument("--json", action="store_true", help="print the report as JSON")
        p.add_argument("--no-safe-forms", action="store_true",
                       help="run the migrator's operations in their plain forms this time "
                            "(MIGRATE_SAFE_FORMS=false; docs/migrations.md)")
