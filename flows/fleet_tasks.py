"""Thin Prefect tasks of the `migrate-fleet` flow: read the targets, plan each database, run one database.

Each database is its own `migrate` flow run: a subflow in this process, or a run of a `migrate`
deployment (``run_deployment``) that any worker of its pool picks up. Either way the run holds a
slot of a Prefect global concurrency limit while it works, so that no more than the limit's
databases migrate at once however many fleet runs or workers there are.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Optional, cast

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.states import State
from prefect.variables import Variable

from dbcore.connection import Target
from dbcore.deploy import fleet as fleets
from dbcore.deploy.fleet_report import DatabaseOutcome, Outcome
from dbcore.errors import ConfigError, DbcoreError
from dbcore.redact import error_line
from dbcore.settings import Settings
from flows.scrub import task


def read_fleet(targets: Optional[str], variable: Optional[str]) -> fleets.Fleet:
    """Return the fleet of the targets file, or of the Prefect Variable holding the same document."""
    if bool(targets) == bool(variable):
        raise ConfigError("give the targets file (--targets FILE) or the Prefect Variable that "
                          "holds it (targets_variable), one of them")
    if targets:
        try:
            with open(targets, encoding="utf-8") as handle:
                text = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read the targets file {targets}: {exc.strerror}: "
                              "give the path of the fleet's YAML file") from None
        return fleets.load_fleet(text, targets)
    value = Variable.get(str(variable))
    if value is None:
        raise ConfigError(f"there is no Prefect Variable {variable}: create it with the targets "
                          f"document (prefect variable set {variable} ...)")
    text = value if isinstance(value, str) else json.dumps(value)  # JSON is YAML
    return fleets.load_fleet(text, f"Prefect Variable {variable}")


@task(name="plan-database", cache_policy=NO_CACHE, task_run_name="plan-{member.name}")
def plan_database(member: fleets.FleetTarget, target: Target, settings: Settings,
                  allow_destructive: bool) -> fleets.DatabasePlan:
    """Return one database's pending migrations, size and lint (an unreachable one says why)."""
    return fleets.plan_database(member, target, settings, allow_destructive)


def set_concurrency_limit(name: str, limit: int) -> None:
    """Create the global concurrency limit ``name`` with ``limit`` slots, or set an existing one's."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)


def member_parameters(member: fleets.FleetTarget, env: str, *, migrations_dir: Optional[str],
                      backup: bool, allow_destructive: bool, dry_run: bool = False,
                      approval: Optional[fleets.FleetApproval] = None,
                      allow_long_locks: bool = False) -> dict:
    """Return the parameters of one database's `migrate` run: names and fingerprints, never a URL."""
    parameters = {"env": env, "database_url_env": member.url_env, "backup": backup,
                  "allow_destructive": allow_destructive, "dry_run": dry_run}
    if allow_long_locks:
        parameters["allow_long_locks"] = True
    if migrations_dir:
        parameters["migrations_dir"] = migrations_dir
    if approval is not None:
        parameters["fleet_approval"] = approval.model_dump()
    return parameters


def _run_member(name: str, parameters: dict, deployment: Optional[str], timeout: float):
    """Run one `migrate` flow run to its end; return (completed?, its final message)."""
    if deployment:
        run = cast(FlowRun, run_deployment(deployment, parameters=parameters, timeout=timeout,
                                           flow_run_name=f"migrate-{name}", poll_interval=2))
        state = run.state
        if state is None or not state.is_final():
            return False, (f"flow run {run.id} did not end within {timeout:g}s: see it in "
                                  "Prefect and check `dbmigrate status` before running again")
        return state.is_completed(), state.message or state.name
    from flows.migrate import migrate  # not at import: flows/migrate.py imports nothing of the fleet

    ran = migrate.with_options(flow_run_name=f"migrate-{name}")(**parameters, return_state=True)
    state = cast(State, ran)  # a sync flow: the state itself
    return state.is_completed(), state.message or state.name


@task(name="migrate-database", cache_policy=NO_CACHE, task_run_name="migrate-{member.name}")
def migrate_database(member: fleets.FleetTarget, target: Target, settings: Settings,
                     parameters: dict, pending: list[str], *, deployment: Optional[str],
                     limit: str, timeout: float) -> DatabaseOutcome:
    """Run one database's `migrate` under a slot of ``limit``; return what happened to it.

    What was applied is read back from the database's own history, the backup key from the
    storage: not from the run's words.
    """
    logger = get_run_logger()
    since = datetime.now(timezone.utc)
    started = time.monotonic()
    dry_run = parameters.get("dry_run", False)
    try:
        with concurrency(limit, occupy=1, timeout_seconds=timeout):
            completed, message = _run_member(member.name, parameters, deployment, timeout)
    except Exception as exc:  # the API or the worker failed us, not the database's run
        logger.exception("running %s failed", member.name)
        completed = False
        message = (f"could not run its migrate flow ({type(exc).__name__}: "
                   f"{error_line(exc, target.password)}): check `dbmigrate status`")
    seconds = time.monotonic() - started
    try:
        applied = () if dry_run else fleets.applied_of(target, pending)
        key = fleets.backup_taken_since(target, settings, since)
    except DbcoreError as exc:
        applied, key = (), ""
        message += f" (its history could not be read: {exc})"
    state: Outcome = "failed"
    if completed:
        state = "dry run" if dry_run else ("applied" if applied else "up to date")
    logger.info("%s: %s in %.1fs: %s", member.name, state, seconds, message)
    return DatabaseOutcome(member.name, state, applied, seconds, key, message)
