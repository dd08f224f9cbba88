"""End-to-end fixtures: a real `prefect server start` for the session, and the process that runs
the `migrate-production` deployment (flow.serve, or a process worker) per test.

Every process is started in its own session and stopped by pid with all its descendants, even
when a test fails: the flow runs of a worker or a runner live in sessions of their own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import httpx
import pytest
from helpers import REPO, wait_until
from prefect_api import PrefectApi
from processes import Service

from dbcore.ports import free_port

BIN = Path(sys.executable).parent
SERVER_START_TIMEOUT = 90.0


@dataclass(frozen=True)
class PrefectServer:
    """A running Prefect server: its API URL and the environment that points a process at it."""

    api_url: str
    env: dict[str, str]

    def api(self) -> PrefectApi:
        """Return a REST client of the server's API (retrying what the server says is retryable)."""
        return PrefectApi(self.api_url)


def healthy(api: PrefectApi) -> bool:
    """Return True once the server answers its health check (refused connections: not yet)."""
    try:
        return api.request("GET", "/health").status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A real `prefect server start` on 127.0.0.1 (own PREFECT_HOME) for the whole session."""
    root = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    server_env = {**os.environ, "PREFECT_HOME": str(root / "home"), "PREFECT_UI_ENABLED": "false",
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    server_env.pop("PREFECT_API_URL", None)
    server = Service("prefect-server", [str(BIN / "prefect"), "server", "start", "--host",
                                        "127.0.0.1", "--port", str(port)], server_env, root)
    api_url = f"http://127.0.0.1:{port}/api"
    try:
        with PrefectApi(api_url) as api:
            wait_until(lambda: healthy(api), f"prefect server to answer {api_url}/health",
                       timeout=SERVER_START_TIMEOUT, gave_up=server.exited, log=server.output)
        client_env = {"PREFECT_API_URL": api_url, "PREFECT_HOME": str(root / "client-home"),
                      # never the developer's own `make run` services (.local/services.json)
                      "MIGRATE_LOCAL_DIR": str(root / "no-local-services"),
                      # pick a triggered run up within a second, not the default ten
                      "PREFECT_RUNNER_POLL_FREQUENCY": "1", "PREFECT_WORKER_QUERY_SECONDS": "1"}
        yield PrefectServer(api_url, client_env)
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def production_env(prefect_server, db_url, s3_settings, other_pg_server_url) -> dict[str, str]:
    """The environment of a Fly machine: FLY_APP_NAME, DATABASE_URL, S3 settings and keys, Prefect,
    and the server the rehearsal copy is restored to (never the production cluster)."""
    return {**os.environ, **prefect_server.env, "FLY_APP_NAME": "test-app", "DATABASE_URL": db_url,
            "MIGRATE_MODELS": "dbcore.models:MODELS",
            "MIGRATE_S3_BUCKET": s3_settings.s3_bucket,
            "MIGRATE_S3_ENDPOINT_URL": s3_settings.s3_endpoint_url,
            "MIGRATE_REHEARSAL_DATABASE_URL": other_pg_server_url}


@pytest.fixture
def start_service(tmp_path) -> Iterator[Callable[..., Service]]:
    """Factory: start a Service (logs under tmp_path); every one is stopped after the test."""
    started: list[Service] = []

    def start(name: str, cmd: list[str], env: dict[str, str]) -> Service:
        service = Service(name, cmd, env, tmp_path)
        started.append(service)
        return service

    yield start
    for service in reversed(started):
        service.stop()


@pytest.fixture
def served(start_service, production_env) -> Service:
    """`python deployments/serve.py` running with the production environment, ready for runs."""
    service = start_service("serve", [sys.executable, str(REPO / "deployments" / "serve.py")],
                            production_env)
    service.wait_for_output("is being served")
    return service


@pytest.fixture
def worker(start_service, production_env, prefect_server) -> Service:
    """deployments/prefect.yaml deployed with `prefect deploy`, and a process worker of its pool."""
    prefect = str(BIN / "prefect")
    env = {**os.environ, **prefect_server.env}
    subprocess.run([prefect, "work-pool", "create", "migrations", "--type", "process",
                    "--overwrite"], env=env, cwd=REPO, check=True, capture_output=True, timeout=60)
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file",
                               "deployments/prefect.yaml", "--name", "migrate-production"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    service = start_service("worker", [prefect, "worker", "start", "--pool", "migrations"],
                            production_env)
    service.wait_for_output("started!")
    return service
