"""The embedded default for `make run`: PostgreSQL, an S3 server and a Prefect API under ``.local/``.

What was started is recorded in ``.local/services.json`` so that later commands (``dbmigrate``,
the flow, ``make stop``) find them without any variable set.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psycopg2

from dbcore.embedded import LOCAL_BUCKET, local_services_file
from dbcore.services.postgres import PostgresCluster, server_user_can_reach
from dbcore.services.prefect_api import PrefectApiServer
from dbcore.services.seaweed import embedded_server
from dbcore.settings import Settings

APP_DATABASE = "app"


@dataclass(frozen=True)
class LocalServices:
    """What `make run` started: URLs of the embedded database and S3 (empty when not started)."""

    database_url: str = ""
    postgres_root: str = ""
    s3_endpoint_url: str = ""
    s3_bucket: str = ""
    #: the embedded server's local-only keys (it listens on 127.0.0.1 alone), for dbcore.embedded
    s3_access_key: str = ""
    s3_secret_key: str = ""
    #: the local Prefect API and UI that terminal runs of the flow use (empty: PREFECT_API_URL is set)
    prefect_api_url: str = ""
    prefect_ui_url: str = ""


def read_local_services(settings: Settings) -> LocalServices | None:
    """Return what `make run` recorded, or None."""
    path = local_services_file(settings)
    if not path.exists():
        return None
    known = {f.name for f in fields(LocalServices)}
    # tolerate what an older version recorded
    return LocalServices(**{k: v for k, v in json.loads(path.read_text()).items() if k in known})


def local_postgres_root(settings: Settings) -> Path:
    """Return where the embedded cluster lives: under the local folder, if PostgreSQL may enter it.

    As root, the server runs as the postgres user, which cannot enter a checkout under a private
    folder such as /root: the cluster then lives in a postgres-owned folder under /var/tmp.
    """
    preferred = settings.local_dir / "postgres"
    if server_user_can_reach(settings.local_dir):
        return preferred
    digest = hashlib.sha256(str(settings.local_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"dbmigrate-{digest}" / "postgres"


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


def ensure_local_cluster(settings: Settings) -> str:
    """Start (or reuse) the embedded PostgreSQL cluster under the local folder; return its
    maintenance database URL. The proxy environment rehearses there, never through the tunnel;
    `make stop` stops it."""
    cluster = PostgresCluster(local_postgres_root(settings))
    cluster.init()
    cluster.start()
    return cluster.url("postgres")


def up(settings: Settings) -> LocalServices:
    """Start (or reuse) what is not configured elsewhere; record and return it."""
    root = settings.local_dir
    root.mkdir(parents=True, exist_ok=True)
    database_url = ""
    database_url = postgres_root = ""
    if settings.database_url is None:
        cluster = PostgresCluster(local_postgres_root(settings))
        cluster.init()
        cluster.start()
        _ensure_database(cluster.url("postgres"), APP_DATABASE)
        database_url, postgres_root = cluster.url(APP_DATABASE), str(cluster.root)
    s3 = {}
    if not settings.s3_endpoint_url:
        server = embedded_server(root / "s3")
        server.start()
        server.create_bucket(LOCAL_BUCKET)
        s3 = {"s3_endpoint_url": server.endpoint_url, "s3_bucket": LOCAL_BUCKET,
              "s3_access_key": server.access_key, "s3_secret_key": server.secret_key}
    prefect = {}
    if not os.environ.get("PREFECT_API_URL"):
        api = PrefectApiServer(root / "prefect")
        api.start()
        prefect = {"prefect_api_url": api.api_url, "prefect_ui_url": api.ui_url}
    services = LocalServices(database_url=database_url, postgres_root=postgres_root, **s3, **prefect)
    local_services_file(settings).write_text(json.dumps(asdict(services), indent=2))
    return services


def down(settings: Settings) -> list[str]:
    """Stop whatever `make run` started under the local folder; return what was stopped."""
    root = settings.local_dir
    stopped = []
    recorded = read_local_services(settings)
    cluster = PostgresCluster(Path(recorded.postgres_root) if recorded and recorded.postgres_root
                              else local_postgres_root(settings))
    if cluster.is_running():
        cluster.stop()
        stopped.append("postgres")
    api = PrefectApiServer(root / "prefect")
    if api.is_running():
        api.stop()
        stopped.append("prefect")
    if (root / "s3").exists():
        server = embedded_server(root / "s3")
        if server.is_running():
            server.stop()
            stopped.append("s3")
    local_services_file(settings).unlink(missing_ok=True)
    return stopped
