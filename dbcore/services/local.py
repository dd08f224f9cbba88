"""The embedded default for `make run`: a PostgreSQL cluster and an S3 server under ``.local/``.

What was started is recorded in ``.local/services.json`` so that later commands (``dbmigrate``,
the flow, ``make stop``) find them without any variable set.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass

import psycopg2

from dbcore.connection import local_services_file
from dbcore.services.postgres import PostgresCluster
from dbcore.services.seaweed import LOCAL_BUCKET, embedded_server
from dbcore.settings import Settings

log = logging.getLogger(__name__)

APP_DATABASE = "app"


@dataclass(frozen=True)
class LocalServices:
    """What `make run` started: URLs of the embedded database and S3 (empty when not started)."""

    database_url: str = ""
    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""


def read_local_services(settings: Settings) -> LocalServices | None:
    """Return what `make run` recorded, or None."""
    path = local_services_file(settings)
    if not path.exists():
        return None
    return LocalServices(**json.loads(path.read_text()))


def _ensure_database(server_url: str, name: str) -> None:
    conn = psycopg2.connect(server_url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def up(settings: Settings) -> LocalServices:
    """Start (or reuse) what is not configured elsewhere; record and return it."""
    root = settings.local_dir
    root.mkdir(parents=True, exist_ok=True)
    database_url = ""
    if settings.database_url is None:
        cluster = PostgresCluster(root / "postgres")
        cluster.init()
        cluster.start()
        _ensure_database(cluster.url("postgres"), APP_DATABASE)
        database_url = cluster.url(APP_DATABASE)
    s3 = {}
    if not settings.s3_endpoint_url:
        server = embedded_server(root / "s3")
        server.start()
        server.create_bucket(LOCAL_BUCKET)
        s3 = {"s3_endpoint_url": server.endpoint_url, "s3_bucket": LOCAL_BUCKET,
              "s3_access_key_id": server.access_key, "s3_secret_access_key": server.secret_key}
    services = LocalServices(database_url=database_url, **s3)
    path = local_services_file(settings)
    path.write_text(json.dumps(asdict(services), indent=2))
    os.chmod(path, 0o600)  # it holds the local S3 key
    return services


def down(settings: Settings) -> list[str]:
    """Stop whatever `make run` started under the local folder; return what was stopped."""
    root = settings.local_dir
    stopped = []
    cluster = PostgresCluster(root / "postgres")
    if cluster.is_running():
        cluster.stop()
        stopped.append("postgres")
    if (root / "s3").exists():
        server = embedded_server(root / "s3")
        if server.is_running():
            server.stop()
            stopped.append("s3")
    local_services_file(settings).unlink(missing_ok=True)
    return stopped
