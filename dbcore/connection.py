"""Environment detection (local | proxy | production) and the peewee database for a target.

This is the one place that decides which database a command talks to, as the guide's
``utils/db_connection.py`` did: ``FLY_APP_NAME`` set means production, then
``USE_FLY_POSTGRES_FROM_LOCAL_PROXY=1`` means proxy, otherwise local. Production and proxy are
never chosen by default, and an explicit ``--env`` that contradicts the variables is an error.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterator
from urllib.parse import unquote, urlsplit, urlunsplit

import peewee
import psycopg2

from dbcore.embedded import embedded_database_url
from dbcore.errors import ConfigError, DatabaseUnavailable, EnvMismatch
from dbcore.redact import error_line, mask_url, normalize_db_url, url_password
from dbcore.settings import Settings, url_from_variable


class Env(str, Enum):
    """Where the target database lives."""

    LOCAL = "local"
    PROXY = "proxy"
    PRODUCTION = "production"

    def __str__(self) -> str:
        return self.value


def detect_env(settings: Settings) -> tuple[Env, str]:
    """Return the environment the variables describe, and the reason (which variable said so)."""
    if settings.fly_app_name:
        return Env.PRODUCTION, f"FLY_APP_NAME={settings.fly_app_name}"
    if settings.use_fly_postgres_from_local_proxy:
        return Env.PROXY, "USE_FLY_POSTGRES_FROM_LOCAL_PROXY=1"
    return Env.LOCAL, "neither FLY_APP_NAME nor USE_FLY_POSTGRES_FROM_LOCAL_PROXY is set"


def resolve_env(settings: Settings, requested: Env | str | None = None) -> Env:
    """Return the environment to act on; raise EnvMismatch when ``requested`` contradicts detection."""
    detected, reason = detect_env(settings)
    if requested is None or requested == "":
        return detected
    try:
        wanted = Env(requested)
    except ValueError:
        choices = ", ".join(e.value for e in Env)
        raise ConfigError(f"unknown environment {requested!r}: use one of {choices}") from None
    if wanted is not detected:
        hint = {
            Env.PRODUCTION: "set FLY_APP_NAME (it is set on Fly.io machines)",
            Env.PROXY: "set USE_FLY_POSTGRES_FROM_LOCAL_PROXY=1 and start the proxy",
            Env.LOCAL: "unset FLY_APP_NAME and USE_FLY_POSTGRES_FROM_LOCAL_PROXY",
        }[wanted]
        raise EnvMismatch(
            f"--env {wanted} contradicts the environment, which says {detected} ({reason}): "
            f"{hint}, or pass --env {detected}"
        )
    return wanted


@dataclass(frozen=True)
class Target:
    """A database to act on: its environment and URL. ``str()`` and ``repr()`` never show the password."""

    env: Env
    url: str

    def __post_init__(self) -> None:
        # one spelling of the URL (user and password percent-encoded), so that every parser
        # downstream (urlsplit, libpq) reads a password holding "#", "?" or "/" the same way
        try:
            object.__setattr__(self, "url", normalize_db_url(self.url))
        except ValueError:
            pass  # resolve_target refuses it with its own words

    @property
    def masked_url(self) -> str:
        return mask_url(self.url)

    @property
    def password(self) -> str | None:
        return url_password(self.url)

    @property
    def server(self) -> str:
        """HOST:PORT of the server (no user, no password), for messages."""
        parts = urlsplit(self.url)
        return f"{parts.hostname or 'local socket'}:{parts.port or 5432}"

    @property
    def dbname(self) -> str:
        return urlsplit(self.url).path.lstrip("/") or "postgres"

    def __repr__(self) -> str:
        return f"Target(env={self.env.value!r}, url={self.masked_url!r})"

    __str__ = __repr__

    def with_dbname(self, dbname: str) -> Target:
        """Return the same server and credentials with another database name."""
        parts = urlsplit(self.url)
        return Target(self.env, urlunsplit(parts._replace(path="/" + dbname)))


def resolve_target(
    settings: Settings, env: Env | str | None = None, database_url: str | None = None,
    database_url_env: str | None = None,
) -> Target:
    """Return the database to act on, or raise ConfigError saying which variable to set.

    ``database_url_env`` names the environment variable holding the URL instead of DATABASE_URL
    (a fleet's targets); unset, it is an error, never a fallback to another database.
    """
    resolved = resolve_env(settings, env)
    source = database_url_env or "DATABASE_URL"
    if database_url_env and not database_url:
        database_url = url_from_variable(database_url_env).get_secret_value()
    url = database_url or (
        settings.database_url.get_secret_value() if settings.database_url else None
    )
    if not url and resolved is Env.LOCAL:
        url = embedded_database_url(settings)
        if not url:
            raise ConfigError(
                "no database: DATABASE_URL is not set and no embedded local cluster is running: "
                "set DATABASE_URL, or run `make run` to start the local one"
            )
    if not url:
        raise ConfigError(
            f"DATABASE_URL is not set: the {resolved} environment needs it "
            "(postgres://USER:PASSWORD@HOST:PORT/DBNAME)"
        )
    if not url.startswith(("postgres://", "postgresql://")):
        # never echoed: a key=value DSN would show its password
        raise ConfigError(
            f"the database address in {source} is not a postgres:// URL: "
            "use postgres://USER:PASSWORD@HOST:PORT/DBNAME"
        )
    try:
        url = normalize_db_url(url)
    except ValueError:
        # never echoed: the password is what could not be told apart
        raise ConfigError(
            f"the database URL in {source} cannot be read (the password cannot be told from the "
            "host): percent-encode the password's special characters (@ as %40, # as %23, "
            "? as %3F, / as %2F)") from None
    try:
        _ = urlsplit(url).port  # raises on a port that is not a number
    except ValueError:
        raise ConfigError(
            f"the port in {mask_url(url).split('@')[-1].split('/')[0]} is not a number: "
            f"fix {source}"
        ) from None
    return Target(resolved, url)


def open_database(target: Target, application_name: str = "dbmigrate") -> peewee.PostgresqlDatabase:
    """Return a peewee database for ``target`` (not yet connected)."""
    parts = urlsplit(target.url)
    params = {
        "host": parts.hostname or None,
        "port": parts.port,
        "user": unquote(parts.username) if parts.username else None,
        "password": target.password,
        "application_name": application_name,
        "connect_timeout": 10,
    }
    # query options such as ?sslmode=require pass straight to libpq
    for pair in filter(None, parts.query.split("&")):
        key, _, value = pair.partition("=")
        params[key] = unquote(value)
    params = {k: v for k, v in params.items() if v is not None}
    return peewee.PostgresqlDatabase(target.dbname, autoconnect=False, **params)  # type: ignore[arg-type]


def _unavailable(target: Target, exc: Exception) -> DatabaseUnavailable:
    """Return the one-line, password-free error for a failed connection."""
    detail = error_line(exc, target.password)
    return DatabaseUnavailable(
        f"cannot connect to {target.masked_url}: {detail}: check that the server is running "
        "and DATABASE_URL is right"
    )


def connect(target: Target, application_name: str = "dbmigrate") -> peewee.PostgresqlDatabase:
    """Return a connected peewee database, or raise DatabaseUnavailable (password scrubbed)."""
    db = open_database(target, application_name)
    try:
        db.connect()
    except (peewee.OperationalError, psycopg2.OperationalError) as exc:
        raise _unavailable(target, exc) from None
    return db


def connect_raw(target: Target, application_name: str = "dbmigrate"):
    """Return a plain autocommit psycopg2 connection (for the advisory lock and catalog queries)."""
    db = open_database(target, application_name)
    try:
        conn = psycopg2.connect(dbname=db.database, **db.connect_params)
    except psycopg2.OperationalError as exc:
        raise _unavailable(target, exc) from None
    conn.autocommit = True
    return conn


@contextmanager
def raw_session(target: Target, application_name: str = "dbmigrate") -> Iterator[Any]:
    """A short plain autocommit psycopg2 session for the block, closed at its end.

    ``application_name`` reads "dbmigrate AREA[: what]" in pg_stat_activity (cut to 63 bytes).
    """
    conn = connect_raw(target, application_name[:63])
    try:
        yield conn
    finally:
        conn.close()


def server_version(target: Target) -> str:
    """Connect once and return the server's version; raise DatabaseUnavailable."""
    db = connect(target)
    try:
        return db.execute_sql("SHOW server_version").fetchone()[0]
    finally:
        db.close()
