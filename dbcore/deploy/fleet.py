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
from dbcore.errors import DbcoreError, FleetFileError, PlanNotApproved
from dbcore.migrate.history import read_applied
from dbcore.migrate.plan import Plan
from dbcore.settings import ENV_VAR_NAME, Settings

DEFAULT_CANARY = 1
DEFAULT_CONCURRENCY = 4
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_TOP_KEYS = {"canary", "concurrency", "databases"}
_TARGET_KEYS = {"name", "url_env"}


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


def _digest(data: object) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def database_fingerprint(name: str, migrations: list[tuple[str, str]]) -> str:
    """Return the fingerprint of one database's part of a fleet plan: its name, pending names and sha256s."""
    return _digest({"database": name, "migrations": [list(m) for m in migrations]})


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

    @property
    def fingerprint(self) -> str:
        return database_fingerprint(self.name, list(self.migrations))

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
                        report.summary(), report.ok)


def fleet_fingerprint(plans: list[DatabasePlan]) -> str:
    """Return the fingerprint the fleet's approval covers: every database's part, in order."""
    return _digest([[p.name, p.fingerprint] for p in plans])


class FleetApproval(BaseModel):
    """Handed to each database's `migrate` run: the fleet plan was approved, this database's part is this.

    Holds fingerprints and a name only (it is a flow parameter, stored by Prefect's API).
    """

    model_config = ConfigDict(frozen=True)

    fleet_fingerprint: str
    database: str
    plan_fingerprint: str
    approver: str = ""

    def check(self, plan: Plan) -> str | None:
        """Return the approver (None if nobody approved) if ``plan`` is the approved one; else raise PlanNotApproved."""
        mine = database_fingerprint(self.database, [(m.name, m.sha256) for m in plan.migrations])
        if mine != self.plan_fingerprint:
            raise PlanNotApproved(
                f"the plan of {self.database} ({', '.join(plan.names) or 'nothing'}) is not the one the "
                f"fleet approval {self.fleet_fingerprint[:12]} covered (migration files or history "
                "changed since): run the fleet again and approve the new plan")
        return self.approver or None


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
