"""Shared fixtures: a real private PostgreSQL 15 cluster for the session, a fresh database per test.

``TEST_DATABASE_URL`` (a URL of a server where the user may create databases) replaces the
private cluster.
"""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import psycopg2
import pytest
from helpers import SAMPLE_MIGRATIONS

from dbcore.connection import Env, Target
from dbcore.services.postgres import PostgresCluster
from dbcore.settings import Settings

# Tests never read the developer's own configuration.
for _var in ("DATABASE_URL", "FLY_APP_NAME", "USE_FLY_POSTGRES_FROM_LOCAL_PROXY"):
    os.environ.pop(_var, None)
for _var in [v for v in os.environ if v.startswith("MIGRATE_")]:
    os.environ.pop(_var, None)
# Never what `make run` left under .local/ (services.json, the embedded database, Prefect's home):
# `make run && make test` must pass, and the developer's local state must stay as it was. A test
# that needs embedded services sets them up itself under its own temporary folder.
os.environ["MIGRATE_LOCAL_DIR"] = tempfile.mkdtemp(prefix="dbmigrate-local-")
atexit.register(shutil.rmtree, os.environ["MIGRATE_LOCAL_DIR"], ignore_errors=True)
for _var in ("PREFECT_API_URL", "PREFECT_PROFILES_PATH"):
    os.environ.pop(_var, None)
# Prefect, for the flow tests: a private home, quiet, offline, patient with a cold start.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="dbmigrate-prefect-")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def pg_server_url():
    """URL of the maintenance database of a running PostgreSQL server for the whole session."""
    if os.environ.get("TEST_DATABASE_URL"):
        yield os.environ["TEST_DATABASE_URL"]
        return
    root = Path(tempfile.mkdtemp(prefix="dbmigrate-pg-"))
    cluster = PostgresCluster(root)
    cluster.init()
    cluster.start(fast=True)
    try:
        yield cluster.url("postgres")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def other_pg_server_url():
    """URL of the maintenance database of a second private server: where a rehearsal copy goes
    when it must not land on the target's cluster."""
    root = Path(tempfile.mkdtemp(prefix="dbmigrate-pg-other-"))
    cluster = PostgresCluster(root)
    cluster.init()
    cluster.start(fast=True)
    try:
        yield cluster.url("postgres")
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def _admin(server_url: str):
    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    return conn


@pytest.fixture
def make_database(pg_server_url):
    """Factory: create a fresh empty database and return its URL; all are dropped afterwards."""
    created: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        conn = _admin(pg_server_url)
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()
        created.append(name)
        return pg_server_url.rsplit("/", 1)[0] + "/" + name

    yield make
    conn = _admin(pg_server_url)
    with conn.cursor() as cur:
        for name in created:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    conn.close()


@pytest.fixture
def forwarder_settings(pg_server_url, tmp_path) -> Settings:
    """Settings whose tunnel command is the TCP forwarder (tests/tcp_forwarder.py, in place of
    `fly proxy`) to the test PostgreSQL server."""
    server = urlsplit(pg_server_url)
    forwarder = Path(__file__).resolve().parent / "tcp_forwarder.py"
    command = (f"{shlex.quote(sys.executable)} {shlex.quote(str(forwarder))} {{local_port}} "
               f"{server.hostname} {server.port}")
    return Settings(proxy_command=command, proxy_local_port=0, proxy_start_timeout=10,
                    local_dir=tmp_path / ".local")


@pytest.fixture
def db_url(make_database) -> str:
    """URL of a fresh, empty database for this test."""
    return make_database()


@pytest.fixture
def target(db_url) -> Target:
    return Target(Env.LOCAL, db_url)


@pytest.fixture
def settings(tmp_path) -> Settings:
    """Settings with short waits so that lock tests finish quickly."""
    return Settings(
        migrations_dir=tmp_path / "migrations",
        advisory_lock_wait=2.0,
        lock_timeout="1s",
        local_dir=tmp_path / ".local",
    )


@pytest.fixture
def migrations_dir(tmp_path) -> Path:
    """A copy of the sample application's migrations that a test may change."""
    dest = tmp_path / "migrations"
    shutil.copytree(SAMPLE_MIGRATIONS, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.fixture
def receiver(monkeypatch):
    """A real HTTP receiver of notifications on 127.0.0.1, set as MIGRATE_NOTIFY_URL."""
    from receiver import Receiver

    server = Receiver()
    monkeypatch.setenv("MIGRATE_NOTIFY_URL", server.url)
    yield server
    server.close()


# Fixtures of other areas live in their own modules beside this file (S3 server, flows).
pytest_plugins = ["fixtures_s3", "fixtures_flows"]
