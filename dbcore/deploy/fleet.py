"""A fleet of databases: the targets file, the waves, each database's plan and the fleet's fingerprint.

The targets file (YAML) names databases, never their addresses::

    canary: 1          # databases migrated (and post-checked) first, alone; default 1
    concurrency: 4     # databases at once in every later wave; default 4
    databases:
      - {name: tenant-a, url_env: TENANT_A_DATABASE_URL}
      - {name: tenant-b, url_env: TENANT_B_DATABASE_URL}

``url_env`` names the environment variable that holds the database's URL where the runs happen:
no URL or password is in the file, in a flow's parameters or in Prefect's API.

Plan first: :func:`plan_database` returns what each database would get; :class:`FleetPlan` is
what the approver reads and what its fingerprint covers; :class:`FleetApproval` is handed to every
database's run, which refuses to apply anything but the very plan that was approved.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime

import yaml
from pydantic import BaseModel, ConfigDict

from dbcore.backup.dump import database_size, list_backups
from dbcore.connection import Env, Target, connect, resolve_target
from dbcore.deploy.plan import plan_and_lint
from dbcore.errors import DbcoreError, FleetApprovalRefused, FleetFileError, PlanNotApproved
from dbcore.migrate.history import read_applied
from dbcore.migrate.plan import Plan
from dbcore.settings import ENV_VAR_NAME, Settings

DEFAULT_CANARY = 1
DEFAULT_CONCURRENCY = 4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TOP_KEYS = {"canary", "concurrency", "databases"}
_TARGET_KEYS = {"name", "url_env"}


#: the flow whose approval a database's run may be handed, and the only deployment that takes it
FLEET_FLOW = "migrate-fleet"
FLEET_MEMBER_DEPLOYMENT = "migrate-fleet-member"


@dataclass(frozen=True)
class FleetTarget:
    """One database of the fleet: a name for people, and the variable that holds its URL."""

    name: str
    url_env: str


@dataclass(frozen=True)
class Fleet:
    """The targets file, validated: canary count, wave size, the databases in order."""

    canary: int
    concurrency: int
    databases: tuple[FleetTarget, ...]

    def waves(self) -> list[tuple[FleetTarget, ...]]:
        """Return the canary wave (if any) and then waves of ``concurrency`` databases, in file order."""
        first = [self.databases[:self.canary]] if self.canary else []
        rest = self.databases[self.canary:]
        return first + [rest[i:i + self.concurrency] for i in range(0, len(rest), self.concurrency)]


def _count(doc: dict, key: str, default: int, least: int, where: str) -> int:
    value = doc.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise FleetFileError(f"{where}: {key} must be a whole number of at least {least} "
                             f"(it is {value!r})")
    return value


def _target(item: object, index: int, where: str) -> FleetTarget:
    here = f"{where}: databases[{index}]"
    if not isinstance(item, dict):
        raise FleetFileError(f"{here} must be a mapping {{name: ..., url_env: ...}}")
    unknown = sorted(set(map(str, item)) - _TARGET_KEYS)
    if unknown:
        raise FleetFileError(f"{here} has unknown key(s) {', '.join(unknown)}: only name and url_env; "
                             "put the URL in an environment variable and name it in url_env")
    name, url_env = item.get("name"), item.get("url_env")
    if not isinstance(name, str) or not _NAME.match(name):
        raise FleetFileError(f"{here}: name must be letters, digits, '.', '_' or '-' (it is {name!r})")
    if not isinstance(url_env, str) or not ENV_VAR_NAME.match(url_env):
        # a URL here would be echoed: say only that it is not a variable name
        raise FleetFileError(f"{here} ({name}): url_env must be the NAME of an environment variable "
                             "(letters, digits, _) that holds the URL, not the URL itself")
    return FleetTarget(name, url_env)


def load_fleet(text: str, where: str = "targets") -> Fleet:
    """Return the fleet a targets document describes; raise FleetFileError naming what is wrong."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise FleetFileError(f"{where} is not valid YAML{at}: fix the file") from None
    if not isinstance(doc, dict):
        raise FleetFileError(f"{where} must be a mapping with canary, concurrency and databases")
    unknown = sorted(set(map(str, doc)) - _TOP_KEYS)
    if unknown:
        raise FleetFileError(f"{where} has unknown key(s) {', '.join(unknown)}: "
                             "use canary, concurrency and databases")
    items = doc.get("databases")
    if not isinstance(items, list) or not items:
        raise FleetFileError(f"{where}: databases must be a non-empty list of {{name, url_env}}")
    databases = tuple(_target(item, i, where) for i, item in enumerate(items))
    for field in ("name", "url_env"):
        seen: set[str] = set()
        for t in databases:
            value = getattr(t, field)
            if value in seen:
                raise FleetFileError(f"{where}: {field} {value} appears twice: each database once")
            seen.add(value)
    canary = _count(doc, "canary", DEFAULT_CANARY, 0, where)
    if canary > len(databases):
        raise FleetFileError(f"{where}: canary is {canary} but there are only {len(databases)} "
                             "databases: lower canary")
    return Fleet(canary, _count(doc, "concurrency", DEFAULT_CONCURRENCY, 1, where), databases)


def check_size(fleet: Fleet, limit: int, where: str = "targets") -> None:
    """Refuse a fleet of more than ``limit`` databases (FleetFileError): split it into several files."""
    if len(fleet.databases) > limit:
        raise FleetFileError(
            f"{where} names {len(fleet.databases)} databases, more than the {limit} one fleet run "
            "takes (each is planned before the approval and runs as its own flow run): split it "
            "into several targets files, or raise MIGRATE_FLEET_MAX_DATABASES")


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def database_fingerprint(name: str, migrations: list[tuple[str, str]],
                         inputs: tuple[tuple[str, str], ...] = ()) -> str:
    """Return the fingerprint of one database's part of a fleet plan: its name, pending names and
    sha256s, and every file of the migrations folder (``Plan.inputs``: data files too) when
    anything is pending."""
    data = {"database": name, "migrations": [list(m) for m in migrations]}
    if migrations and inputs:
        data["inputs"] = [list(i) for i in inputs]
    return _digest(data)


@dataclass(frozen=True)
class DatabasePlan:
    """What one database of the fleet would get, or why it cannot be planned (``error``)."""

    name: str
    url_env: str
    dbname: str = ""
    migrations: tuple[tuple[str, str], ...] = ()  # (name, sha256) of each pending migration
    size_bytes: int = 0
    lint_summary: str = ""
    lint_ok: bool = True
    error: str = ""
    inputs: tuple[tuple[str, str], ...] = ()  # (path, sha256) of every file of the migrations folder

    @property
    def fingerprint(self) -> str:
        return database_fingerprint(self.name, list(self.migrations), self.inputs)

    @property
    def ok(self) -> bool:
        return not self.error and self.lint_ok


def resolve_member(member: FleetTarget, settings: Settings, env: Env | str | None) -> Target:
    """Return the target of one fleet database (its URL from ``member.url_env``); raise ConfigError."""
    return resolve_target(settings, env, database_url_env=member.url_env)


def plan_database(member: FleetTarget, target: Target, settings: Settings,
                  allow_destructive: bool = False) -> DatabasePlan:
    """Return one database's pending migrations, size and lint (a DbcoreError becomes ``error``)."""
    try:
        plan, report = plan_and_lint(target, settings, allow_destructive=allow_destructive)
        size = database_size(target)
    except DbcoreError as exc:
        return DatabasePlan(member.name, member.url_env, target.dbname, error=str(exc))
    return DatabasePlan(member.name, member.url_env, target.dbname,
                        tuple((m.name, m.sha256) for m in plan.migrations), size,
                        report.summary(), report.ok, inputs=plan.inputs)


def fleet_parts(plans: list[DatabasePlan]) -> list[list[str]]:
    """Return what the fleet's fingerprint covers: each database's name, URL variable and plan, in order."""
    return [[p.name, p.url_env, p.fingerprint] for p in plans]


def fleet_fingerprint(plans: list[DatabasePlan]) -> str:
    """Return the fingerprint the fleet's approval covers: every database's part, in order."""
    return parts_fingerprint(fleet_parts(plans))


def parts_fingerprint(parts: list[list[str]]) -> str:
    """Return the fingerprint of a fleet's parts (as :func:`fleet_parts` lists them)."""
    return _digest(parts)


class FleetApproval(BaseModel):
    """Handed to each database's `migrate` run: the fleet plan was approved, this database's part is this.

    Holds fingerprints and a name only (it is a flow parameter, stored by Prefect's API).
    """

    model_config = ConfigDict(frozen=True)

    fleet_fingerprint: str
    database: str
    plan_fingerprint: str
    #: who approved: informative only; the run records the approver stored on the fleet run
    approver: str = ""
    #: the `migrate-fleet` run that asked for the approval (its record is checked, see below)
    fleet_run_id: str = ""

    def check(self, plan: Plan) -> str | None:
        """Return the approver (None if nobody approved) if ``plan`` is the approved one; else raise PlanNotApproved."""
        mine = database_fingerprint(self.database, [(m.name, m.sha256) for m in plan.migrations],
                                    plan.inputs)
        if mine != self.plan_fingerprint:
            raise PlanNotApproved(
                f"the plan of {self.database} ({', '.join(plan.names) or 'nothing'}) is not the one the "
                f"fleet approval {self.fleet_fingerprint[:12]} covered (migration files or history "
                "changed since): run the fleet again and approve the new plan")
        return self.approver or None


@dataclass(frozen=True)
class FleetRunRecord:
    """What Prefect's API holds about the fleet run an approval names, and about the run handed it.

    Read by the flow (dbcore never talks to Prefect); judged by :func:`verify_fleet_approval`.
    """

    member_deployment: str | None  # the deployment of the run handed the approval; None: none
    found: bool = False  # the named fleet run exists
    flow_name: str = ""
    state: str = ""  # its state type: RUNNING while it runs its databases
    member_is_child: bool = False  # the run handed the approval was started by that fleet run
    parts: list | None = None  # what the fleet run stored of its plan (fleet_parts), if anything
    approvers: tuple[str, ...] = ()  # the names of its stored, valid approvals of that fingerprint


def verify_fleet_approval(approval: FleetApproval, url_env: str | None, record: FleetRunRecord, *,
                          needs_person: bool) -> FleetApproval:
    """Return ``approval`` with the approver Prefect's record names, if the record bears it out.

    A made-up approval (any run can be started with any parameters) is refused: it must name a
    `migrate-fleet` run that is running, started this run, stored a plan whose fingerprint is the
    approved one and that holds this database (name, URL variable, plan), and, where a person
    must approve (``needs_person``: a live database), holds a stored approval of that fingerprint.
    Raises FleetApprovalRefused naming what does not hold; the plan itself is compared later
    (:meth:`FleetApproval.check`).
    """
    def refuse(why: str) -> FleetApprovalRefused:
        return FleetApprovalRefused(f"fleet_approval refused: {why}")

    if record.member_deployment not in (None, FLEET_MEMBER_DEPLOYMENT):
        raise refuse(f"the {record.member_deployment} deployment never takes one (only "
                     f"{FLEET_MEMBER_DEPLOYMENT} runs started by a {FLEET_FLOW} run do): start it "
                     "without fleet_approval, and approve its own plan when it pauses")
    fleet = approval.fleet_run_id or "(none)"
    if not record.found:
        raise refuse(f"it names no {FLEET_FLOW} run that exists (fleet_run_id {fleet[:36]}): "
                     f"run the fleet with flows/fleet.py and approve it there")
    if record.flow_name != FLEET_FLOW:
        raise refuse(f"run {fleet} is a {record.flow_name} run, not a {FLEET_FLOW} run")
    if record.state != "RUNNING":
        raise refuse(f"the {FLEET_FLOW} run {fleet} is {record.state or 'not running'}, so it "
                     "starts no database: run the fleet again")
    if not record.member_is_child:
        raise refuse(f"this run was not started by the {FLEET_FLOW} run {fleet}: only the fleet "
                     "starts its databases' runs")
    if record.parts is None or parts_fingerprint(record.parts) != approval.fleet_fingerprint:
        raise refuse(f"the {FLEET_FLOW} run {fleet} holds no plan of fingerprint "
                     f"{approval.fleet_fingerprint[:12]}")
    if [approval.database, url_env or "", approval.plan_fingerprint] not in record.parts:
        raise refuse(f"the approved fleet plan {approval.fleet_fingerprint[:12]} has no database "
                     f"{approval.database} read from {url_env or 'DATABASE_URL'} with this plan")
    if needs_person and not record.approvers:
        raise refuse(f"nobody approved the fleet plan {approval.fleet_fingerprint[:12]} on run "
                     f"{fleet}: approve the fleet run, not its databases")
    approver = record.approvers[-1] if record.approvers else ""
    return approval.model_copy(update={"approver": approver})


def applied_of(target: Target, pending: list[str]) -> tuple[str, ...]:
    """Return which of ``pending`` the database's history now holds (what a run applied and kept)."""
    db = connect(target, "dbmigrate-fleet")
    try:
        done = {m.name for m in read_applied(db)}
    finally:
        db.close()
    return tuple(name for name in pending if name in done)


def backup_taken_since(target: Target, settings: Settings, since: datetime) -> str:
    """Return the key of the newest backup of the database taken after ``since``, or "" (none, or no S3)."""
    if not settings.s3_bucket:
        return ""
    backups = list_backups(settings, database=target.dbname, env=str(target.env))
    return next((b.key for b in backups if b.created_at >= since), "")
