"""A production fleet run as an operator starts it: one approval, then two process workers share the
databases' `migrate` runs (deployment migrate/migrate-fleet-member) on a real Prefect server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO, query, wait_until
from test_production_deployment import ALL, history

BIN = os.path.dirname(sys.executable)
FLEET_TIMEOUT = 300.0


def _paused(api) -> list[dict]:
    return api.post("/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["PAUSED"]}}}})


def test_two_workers_share_an_approved_fleet_run(prefect_server, make_database, s3_settings,
                                                other_pg_server_url, start_service, tmp_path):
    urls = {f"TENANT_{i}_URL": make_database(f"fleet{i}") for i in range(1, 7)}
    targets = tmp_path / "fleet.yaml"
    targets.write_text("canary: 1\nconcurrency: 2\ndatabases:\n" + "".join(
        f"  - {{name: tenant-{i}, url_env: TENANT_{i}_URL}}\n" for i in range(1, 7)))
    env = {**os.environ, **prefect_server.env, **urls, "FLY_APP_NAME": "test-app",
           "MIGRATE_S3_BUCKET": s3_settings.s3_bucket,
           "MIGRATE_S3_ENDPOINT_URL": s3_settings.s3_endpoint_url, "MIGRATE_MODELS": "dbcore.models:MODELS",
           # production rehearses on a copy on another server, never on the production cluster
           "MIGRATE_REHEARSAL_DATABASE_URL": other_pg_server_url}
    prefect = os.path.join(BIN, "prefect")
    subprocess.run([prefect, "work-pool", "create", "migrations", "--type", "process", "--overwrite"],
                   env=env, cwd=REPO, check=True, capture_output=True, timeout=60)
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file",
                               "deployments/prefect.yaml", "--name", "migrate-fleet-member"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    # one run at a time each: a wave of two is shared by the two workers
    # INFO: a worker's log names each flow run it submits
    workers = [start_service(f"worker-{n}", [prefect, "worker", "start", "--pool", "migrations",
                                             "--name", f"worker-{n}", "--limit", "1"],
                             {**env, "PREFECT_LOGGING_LEVEL": "INFO"})
               for n in (1, 2)]
    for worker in workers:
        worker.wait_for_output("started!")
    fleet = start_service("fleet", [sys.executable, str(REPO / "flows" / "fleet.py"), "--env",
                                    "production", "--targets", str(targets), "--deployment",
                                    "migrate/migrate-fleet-member"], env)

    with prefect_server.api() as api:
        paused: list = []
        wait_until(lambda: paused.extend(_paused(api)) or paused, "the fleet run to pause for approval",
                   timeout=FLEET_TIMEOUT, gave_up=fleet.exited, log=fleet.output, interval=1)
        assert len(paused) == 1 and paused[0]["name"] == "migrate-fleet-production"
        assert all(history(url) == [] for url in urls.values())  # only the canary's copy was migrated
        answer = api.post(f"/flow_runs/{paused[0]['id']}/resume",
                          {"run_input": {"approve": True, "approver": "Ada"}})
        assert answer["status"] == "ACCEPT", answer
        assert fleet.wait_for_exit(timeout=FLEET_TIMEOUT) == 0, fleet.output()
        assert fleet.output().splitlines()[-1] == ("migrate-fleet: 6 applied, 0 up to date, 0 failed, "
                                                   "0 not started")
        members = api.post("/flow_runs/filter", {"flow_runs": {"parent_task_run_id": {"is_null_": False}}})
        table = api.post("/artifacts/filter", {"artifacts": {"key": {"any_": ["fleet-result"]}}})
    for url in urls.values():
        assert history(url) == ALL
        assert query(url, "SELECT DISTINCT actor FROM migration_audit") == [("Ada",)]
    # seven runs of the deployment (the canary's rehearsal, then six), shared by both workers
    assert len(members) == 7 and all(r["state"]["type"] == "COMPLETED" for r in members)
    for worker in workers:
        assert sum(r["id"] in worker.output() for r in members) >= 1, worker.output()
    rows = json.loads(table[0]["data"])
    assert [r["state"] for r in rows] == ["applied"] * 6 and all(r["backup key"] != "-" for r in rows)
    # each run was told which variable holds its URL, never the URL
    assert sorted(r["parameters"]["database_url_env"] for r in members) == sorted(
        ["TENANT_1_URL", *urls])
    stored = json.dumps([members, table])
    assert "postgres://" not in stored and not any(url in fleet.output() for url in urls.values())
