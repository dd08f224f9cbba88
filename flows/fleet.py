"""The `migrate-fleet` flow: the same pending migrations to many databases, canary first, in waves.

read the targets -> plan every database (pending, size, lint) -> rehearse the canary on a copy
-> fleet-plan artifact -> [dry run stops] -> one approval of the fleet plan's fingerprint ->
the canary databases, then waves of `concurrency` -> fleet-result table artifact.

Each database is its own `migrate` flow run (flows/migrate.py), handed the fleet's approval: it
re-checks that its plan is the approved one and refuses otherwise. The first failure stops every
later wave; databases not started stay untouched. ``--deployment migrate/migrate-fleet-member``
runs them on a work pool's workers instead of in this process.

Run it: ``python flows/fleet.py --env local --targets fleet.yaml``. No ``from __future__ import
annotations`` here (Prefect reads the parameter annotations at run time).
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Literal, Optional, cast

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dbcore")
if __name__ == "__main__":  # a terminal run: the local Prefect API of `make run`, if it is up
    from flows.local_api import use_local_api

    use_local_api()

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State
from pydantic import ValidationError

from dbcore.connection import Env, resolve_env
from dbcore.deploy import fleet as fleets
from dbcore.deploy import policy
from dbcore.deploy.fleet_report import FleetPlan, all_succeeded, final_line, not_started
from dbcore.errors import ConfigError, DbcoreError
from dbcore.proxy import Tunnel
from dbcore.settings import Settings, describe_invalid
from flows import fleet_check, fleet_tasks, tasks
from flows.approval import ask_approval
from flows.current import current_flow_run
from flows.scrub import create_markdown_artifact, create_table_artifact

EnvName = Literal["local", "proxy", "production"]
#: the global concurrency limit every database's run holds a slot of
DEFAULT_LIMIT = "migrate-fleet"


def _run_name() -> str:
    env = current_flow_run().parameters.get("env") or "auto"
    return f"migrate-fleet-{env}"


def _nothing_changed(stage: str, detail: object) -> State:
    return Failed(message=f"failed at {stage}, nothing changed: {detail}")


def _configure(env, targets, targets_variable, migrations_dir, backup, require_approval):
    """Return (fleet, settings, env, approval needed? by the live-target policy); raise ConfigError."""
    fleet = fleet_tasks.read_fleet(targets, targets_variable)
    settings = Settings(**({"migrations_dir": Path(migrations_dir)} if migrations_dir else {}))
    fleets.check_size(fleet, settings.fleet_max_databases, targets or f"Prefect Variable {targets_variable}")
    resolved = resolve_env(settings, env)
    needed = policy.approval_needed(resolved, backup=backup, require_approval=require_approval)
    if resolved is Env.PROXY and settings.proxy_local_port != 0:
        raise ConfigError("a fleet through the proxy opens a tunnel per database: set "
                          "MIGRATE_PROXY_LOCAL_PORT=0 so that each picks a free port")
    return fleet, settings, resolved, needed


def _ask(plan: FleetPlan, timeout: int) -> tuple[Optional[str], Optional[State]]:
    """Pause for the one approval of the fleet plan; return (approver, None) or (None, the refusal).

    The same helper as a single database's approval (flows/approval.py): the form carries the
    fleet plan's fingerprint, the pause key is unique to the attempt, the approver is notified.
    """
    decision = ask_approval(plan.to_markdown(), headline=plan.headline(),
                            target=f"a fleet of {len(plan.databases)} databases ({plan.env})",
                            fingerprint=plan.fingerprint, timeout=timeout, consequence="nothing changed")
    if not decision.approved:
        return None, Failed(message=f"{decision.refusal}, nothing changed")
    get_run_logger().info("fleet plan %s approved by %s", plan.fingerprint[:12], decision.approver)
    return decision.approver, None


def _rehearse_canary(canary, pending, settings, env_name, common, run_one) -> list:
    """Rehearse each canary database with pending migrations on a copy (its own `migrate` dry run).

    Returns (database, passed?, message) for each.
    """
    rehearsals = []
    for member, target in canary:
        if pending[member.name]:
            rehearse = fleet_tasks.migrate_database.with_options(task_run_name=f"rehearse-{member.name}")
            outcome = rehearse(member, target, settings, fleet_tasks.member_parameters(
                member, env_name, dry_run=True, **common), [], **run_one)
            rehearsals.append((member.name, outcome.state == "dry run", outcome.message))
    return rehearsals


def _run_waves(plan: FleetPlan, targets_of: dict, approver: str, settings: Settings, env_name: str,
               common: dict, run_one: dict) -> list:
    """Run the waves, each database its own `migrate` run handed its part of the approval.

    Returns every database's outcome; the first failure leaves the later waves "not started".
    """
    outcomes: list = []
    waves = plan.fleet.waves()
    for number, wave in enumerate(waves, 1):
        get_run_logger().info("wave %s of %s: %s", number, len(waves), ", ".join(m.name for m in wave))
        futures = []
        for member in wave:
            part = next(p for p in plan.databases if p.name == member.name)
            approval = fleets.FleetApproval(fleet_fingerprint=plan.fingerprint, database=member.name,
                                            plan_fingerprint=part.fingerprint, approver=approver,
                                            fleet_run_id=str(current_flow_run().id))
            parameters = fleet_tasks.member_parameters(member, env_name, approval=approval, **common)
            pending = [name for name, _ in part.migrations]
            futures.append(fleet_tasks.migrate_database.submit(
                member, targets_of[member], settings, parameters, pending, **run_one))
        outcomes += [future.result() for future in futures]
        if not all_succeeded(outcomes):
            outcomes += not_started([m.name for w in waves[number:] for m in w])
            break
    return outcomes


@flow(name="migrate-fleet", flow_run_name=_run_name, log_prints=False, validate_parameters=True)
def migrate_fleet(
    env: Optional[EnvName] = None,
    targets: Optional[str] = None,
    targets_variable: Optional[str] = None,
    dry_run: bool = False,
    require_approval: Optional[bool] = None,
    approval_timeout_seconds: int = 3600,
    backup: bool = True,
    allow_destructive: bool = False,
    migrations_dir: Optional[str] = None,
    deployment: Optional[str] = None,
    concurrency_limit: str = DEFAULT_LIMIT,
    database_timeout_seconds: int = 6 * 3600,
    allow_long_locks: bool = False,
):
    """Migrate every database of the fleet; return a state whose message counts the outcomes."""
    tasks.show_dbcore_logs()
    logger = get_run_logger()
    try:
        fleet, settings, resolved, approval_needed = _configure(
            env, targets, targets_variable, migrations_dir, backup, require_approval)
        members = [(m, fleets.resolve_member(m, settings, resolved)) for m in fleet.databases]
    except ValidationError as exc:
        return _nothing_changed("configuration", describe_invalid(exc))
    except DbcoreError as exc:
        return _nothing_changed("configuration", exc)
    env_name = str(resolved)
    common = {"migrations_dir": migrations_dir, "backup": backup,
              "allow_destructive": allow_destructive, "allow_long_locks": allow_long_locks}
    run_one = {"deployment": deployment, "limit": concurrency_limit,
               "timeout": float(database_timeout_seconds)}
    # through the proxy, this run reads every database through one tunnel of its own
    with contextlib.ExitStack() as stack:
        if resolved is Env.PROXY:
            tunnel: Tunnel = stack.enter_context(tasks.open_tunnel(settings))
            members = [(m, tunnel.target_for(t)) for m, t in members]
        plans = []
        for number, (m, t) in enumerate(members, 1):
            plans.append(fleet_tasks.plan_database(m, t, settings, allow_destructive))
            if number % 25 == 0 and number < len(members):
                logger.info("planned %s of %s databases", number, len(members))
        pending = {p.name: [name for name, _ in p.migrations] for p in plans}
        fleet_tasks.set_concurrency_limit(concurrency_limit, fleet.concurrency)
        rehearsals = []
        if backup and all(p.ok for p in plans):
            rehearsals = _rehearse_canary(members[:fleet.canary], pending, settings, env_name,
                                          common, run_one)
        plan = FleetPlan(env_name, fleet, tuple(plans), tuple(rehearsals))
        create_markdown_artifact(plan.to_markdown(), key="fleet-plan", description=plan.headline())
        logger.info("%s; fingerprint %s", plan.headline(), plan.fingerprint)
        if not plan.ok:
            problems = plan.problems()
            return _nothing_changed("plan", f"{problems[0]}" + (
                f" (and {len(problems) - 1} more, see the fleet-plan artifact)" if len(problems) > 1 else ""))
        if dry_run:
            return Completed(message=f"dry run: {plan.pending} of {len(plans)} databases have pending "
                                     f"migrations; nothing changed")
        if not plan.pending:
            return Completed(message=f"all {len(plans)} databases up to date")
        approver = settings.actor or ""
        # what the approval will cover, kept where each database's run checks it
        fleet_check.record_parts(plan.fingerprint, fleets.fleet_parts(list(plans)))
        if approval_needed:
            approver, refusal = _ask(plan, approval_timeout_seconds)
            if refusal is not None:
                return refusal
        outcomes = _run_waves(plan, dict(members), approver, settings, env_name, common, run_one)
    create_table_artifact([o.row() for o in outcomes], key="fleet-result",
                          description=final_line(outcomes))
    line = final_line(outcomes)
    return Completed(message=line) if all_succeeded(outcomes) else Failed(message=line)


def main(argv: Optional[list] = None) -> int:
    """Run the fleet flow from a terminal: print one line of what happened; exit 0 on success."""
    parser = argparse.ArgumentParser(prog="python flows/fleet.py", description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=["local", "proxy", "production"],
                        help="assert the environment (it must agree with FLY_APP_NAME / "
                             "USE_FLY_POSTGRES_FROM_LOCAL_PROXY)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--targets", help="the fleet's YAML file (canary, concurrency, databases)")
    where.add_argument("--targets-variable", help="a Prefect Variable holding the same document")
    parser.add_argument("--migrations-dir", help="default: ./migrations")
    parser.add_argument("--dry-run", action="store_true",
                        help="plan every database and rehearse the canary; change nothing")
    parser.add_argument("--approve", dest="require_approval", action="store_const", const=True,
                        default=None, help="pause for the fleet approval even locally")
    parser.add_argument("--no-backup", dest="backup", action="store_false",
                        help="local only: skip the backups and the rehearsals")
    parser.add_argument("--allow-destructive", action="store_true",
                        help="allow migrations that drop tables")
    parser.add_argument("--allow-long-locks", action="store_true",
                        help="go on when a table's writes stay blocked longer than "
                             "MIGRATE_LOCK_BUDGET on a rehearsal's copy (recorded)")
    parser.add_argument("--deployment", help="run each database as a run of this `migrate` "
                                             "deployment on its work pool (e.g. migrate/migrate-fleet-member)")
    parser.add_argument("--concurrency-limit", default=DEFAULT_LIMIT,
                        help="name of the Prefect global concurrency limit (default %(default)s)")
    args = parser.parse_args(argv)
    ran = migrate_fleet(env=args.env, targets=args.targets, targets_variable=args.targets_variable,
                        dry_run=args.dry_run, require_approval=args.require_approval,
                        backup=args.backup, allow_destructive=args.allow_destructive,
                        migrations_dir=args.migrations_dir, deployment=args.deployment,
                        concurrency_limit=args.concurrency_limit,
                        allow_long_locks=args.allow_long_locks, return_state=True)
    state = cast(State, ran)  # a sync flow: the state itself
    print(f"migrate-fleet: {state.message or state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
