"""All configuration, read from the environment in this one place.

Standard names (``DATABASE_URL``, ``FLY_APP_NAME``, ``USE_FLY_POSTGRES_FROM_LOCAL_PROXY``) keep the
names the guide and Fly.io use; everything of this product's own starts with ``MIGRATE_``. S3
credentials are not settings: boto3 reads its own chain (``AWS_ACCESS_KEY_ID``, ...).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dbcore.errors import ConfigError
from dbcore.redact import url_password, webhook_secrets

#: where `make run` keeps the embedded PostgreSQL cluster and S3 server (ignored by git)
DEFAULT_LOCAL_DIR = Path(".local")


_DURATION = re.compile(r"^\d+(\.\d+)?\s*(us|ms|s|min|h|d)$")
#: what an environment variable's name may be (a fleet target's url_env)
ENV_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


def duration_seconds(value: str) -> float:
    """Return a PostgreSQL duration setting ("2s", "500ms", "5min", "0") in seconds."""
    match = re.match(r"^(\d+(?:\.\d+)?)\s*(us|ms|s|min|h|d)?$", value.strip())
    if not match:
        raise ValueError(f"not a duration: {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2) or "ms"]


class Settings(BaseSettings):
    """Everything dbcore can be configured with; build one with ``Settings()`` and pass it on."""

    model_config = SettingsConfigDict(env_prefix="MIGRATE_", extra="ignore", populate_by_name=True)

    # -- target database and environment detection (the guide's utils/db_connection.py)
    database_url: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("DATABASE_URL", "database_url")
    )
    fly_app_name: str | None = Field(
        default=None, validation_alias=AliasChoices("FLY_APP_NAME", "fly_app_name")
    )
    use_fly_postgres_from_local_proxy: bool = Field(
        default=False,
        validation_alias=AliasChoices(
            "USE_FLY_POSTGRES_FROM_LOCAL_PROXY", "use_fly_postgres_from_local_proxy"
        ),
    )

    # -- migrations
    migrations_dir: Path = Path("migrations")
    #: how long a DDL statement may wait for a table lock before the batch is rolled back and
    #: retried: long waits queue every application query behind the migration (squawk, pgroll)
    lock_timeout: str = "2s"
    #: upper bound on any one statement of a migration; data fills that need longer say so here
    statement_timeout: str = "5min"
    #: a migration session idle inside its transaction (Python waiting, no statement running)
    #: longer than this is ended by the server and its batch rolled back: it holds table locks
    idle_in_transaction_timeout: str = "30s"
    #: seconds an apply (or a rehearsal, or a rollback) may take in all; past it the run ends the
    #: session from outside the migration code and stops it (PostgreSQL 15 has no transaction_timeout)
    apply_deadline: float = Field(default=3600.0, gt=0)
    #: seconds to wait for another run's migration advisory lock before giving up
    advisory_lock_wait: float = 30.0
    #: key of the session advisory lock that serialises every apply/rollback on a database
    advisory_lock_key: int = 7_262_020_510
    #: the application's models, as module:LIST, for the drift check after every apply; empty:
    #: no models, the schema is not compared (the sample app sets dbcore.models:MODELS)
    models: str = ""
    #: who is recorded in migration_audit; empty means the OS user
    actor: str = ""

    #: rewrite the migrator's risky operations on existing tables into their safe forms (index
    #: builds CONCURRENTLY after the commit, NOT VALID then VALIDATE, ...): docs/migrations.md
    safe_forms: bool = True
    #: parallel workers a phase-2 index build may use (PostgreSQL's max_parallel_maintenance_workers):
    #: 0 builds with one process, leaving the other cores to the application while it runs; on a
    #: 2-core machine PostgreSQL's 2 workers made the writes' p99 5.3 ms against 2.9 ms (bench/RESULTS.md)
    index_build_workers: int = Field(default=0, ge=0, le=64)
    #: an UPDATE or DELETE of the batch changing more rows than this on the rehearsal copy gets
    #: the lint's DS108 (use migrator.backfill)
    large_update_rows: int = Field(default=100_000, ge=1)

    #: retries of an apply rolled back at lock_timeout (nothing was changed), and the base in
    #: seconds of their backoff: doubling, each wait jittered by +-50% so that runs spread out
    lock_retries: int = Field(default=3, ge=0)
    lock_retry_delay: float = Field(default=5.0, ge=0)

    # -- live-database safety: preflight and where the rehearsal runs (dbcore/deploy/)
    #: seconds the preflight waits for blocking sessions to end before the run stops
    preflight_wait: float = Field(default=60.0, ge=0)
    #: a session idle in a transaction (on a table the plan touches) longer than this blocks
    preflight_idle_seconds: float = Field(default=5.0, ge=0)
    #: the server (its maintenance database) the rehearsal copy is restored to
    rehearsal_database_url: SecretStr | None = None
    #: production: let the rehearsal copy be made on the target's own cluster
    rehearsal_on_target: bool = False
    #: refuse a rehearsal server whose PostgreSQL major differs from the target's: which
    #: statements rewrite or scan a table differs between majors
    rehearsal_same_major: bool = False
    #: seconds a table's writes may stay blocked, as measured on the rehearsal's copy, before a
    #: live run stops (rule DL001; locally a warning)
    lock_budget: float = Field(default=5.0, ge=0)

    # -- index proposals and the team's own data checks (dbcore/advise/, dbcore/checks/data.py)
    #: `dbmigrate suggest-indexes`: an index is proposed only if it lowers some query's planned
    #: cost by at least this many percent (HypoPG on a copy)
    index_min_saving: float = Field(default=50.0, gt=0, lt=100)
    #: a command of the team's (its smoke tests) run against the rehearsal's migrated copy, with
    #: DATABASE_URL set to the copy; empty: none. Split like a shell line, run without a shell
    verify_command: str = ""
    #: seconds the verify command may run before the rehearsal stops it and fails
    verify_timeout: float = Field(default=600.0, gt=0)

    # -- fleets (flows/fleet.py)
    #: the most databases one fleet run takes: each is planned one after the other before the
    #: approval, and each becomes a flow run; a larger fleet is split into several targets files
    fleet_max_databases: int = Field(default=500, ge=1)

    # -- backups (S3-compatible storage; credentials come from boto3's own chain)
    s3_bucket: str = ""
    s3_prefix: str = "backups"
    s3_endpoint_url: str = ""
    #: zstd level for backups (1 is fastest; 3 is zstd's default)
    backup_zstd_level: int = 1
    #: compression threads; 0 means one per core
    backup_zstd_threads: int = 0

    # -- notifications (dbcore/notify.py): a Slack-compatible incoming webhook, or any endpoint
    #: that accepts {"text": ...} JSON; its URL holds a token, so it is a secret
    notify_url: SecretStr | None = None
    #: seconds a notification may take before it is given up (it never blocks a run for longer)
    notify_timeout: float = 5.0

    # -- embedded local services for `make run`
    local_dir: Path = DEFAULT_LOCAL_DIR

    # -- the tunnel of the proxy environment (dbcore/proxy.py)
    #: command that opens the tunnel; {local_port} and {app} are filled in, no shell is involved
    proxy_command: str = "fly proxy {local_port}:5432 --app {app}"
    #: port on 127.0.0.1 where the tunnel listens; 0 picks a free one for each run
    proxy_local_port: int = 15432
    #: Fly app of the PostgreSQL cluster (fly proxy's --app)
    proxy_app: str = ""
    #: seconds to wait for the tunnel to accept connections before giving up
    proxy_start_timeout: float = 30.0

    @field_validator("lock_timeout", "statement_timeout", "idle_in_transaction_timeout")
    @classmethod
    def _duration_with_unit(cls, value: str) -> str:
        # PostgreSQL reads a bare number as milliseconds: "2" would be 2 ms, not 2 s
        if value.strip() != "0" and not _DURATION.match(value.strip()):
            raise ValueError("give a number and a unit: ms, s, min or h (for example 2s), or 0 for none")
        return value.strip()

    def database_password(self) -> str | None:
        """Return the password inside DATABASE_URL (to scrub it from any text), or None."""
        return url_password(self.database_url.get_secret_value()) if self.database_url else None

    def secrets(self) -> list[str]:
        """Return every secret the settings hold (the passwords of DATABASE_URL and the rehearsal
        server, the webhook's token), to scrub; the environment's own are scrubbed anyway."""
        urls = [u.get_secret_value() for u in (self.database_url, self.rehearsal_database_url) if u]
        found = [p for p in map(url_password, urls) if p]
        if self.notify_url:
            found += webhook_secrets(self.notify_url.get_secret_value())
        return found


def describe_invalid(exc: ValidationError) -> str:
    """Return a one-line description of invalid settings that names the variables, never their values."""
    parts = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else "?"
        variable = {"database_url": "DATABASE_URL", "fly_app_name": "FLY_APP_NAME",
                    "use_fly_postgres_from_local_proxy": "USE_FLY_POSTGRES_FROM_LOCAL_PROXY"}.get(
            field, field if field.isupper() else f"MIGRATE_{field.upper()}")
        parts.append(f"{variable}: {error['msg']}")
    return "invalid settings: " + "; ".join(parts)


def url_from_variable(variable: str) -> SecretStr:
    """Return the database URL held by the environment variable named ``variable`` (a fleet's url_env).

    Raises ConfigError when the name is not a variable name or the variable is unset or empty;
    the message names the variable, never its value.
    """
    if not ENV_VAR_NAME.match(variable or ""):
        # never echoed: it may be a URL with its password
        raise ConfigError("the database's url_env is not an environment variable name: give the name "
                          "of the variable that holds the URL (letters, digits, _), not the URL itself")
    value = os.environ.get(variable, "").strip()
    if not value:
        raise ConfigError(f"{variable} is not set: set it to the database's URL "
                          "(postgres://USER:PASSWORD@HOST:PORT/DBNAME) where this runs")
    return SecretStr(value)
