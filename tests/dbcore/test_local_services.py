"""`make run`'s embedded default: PostgreSQL, S3 and a Prefect API under .local/, reused, then stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

from helpers import SAMPLE_MIGRATIONS


def run(*args: str, cwd, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=180)


def test_up_apply_reuse_and_down_with_no_database_url(tmp_path):
    # the defaults a user has: .local/ under the working directory (here the test's own folder)
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "PREFECT_API_URL", "MIGRATE_LOCAL_DIR")}
    env["MIGRATE_MIGRATIONS_DIR"] = str(SAMPLE_MIGRATIONS)
    up = run("dbcore.services", "up", cwd=tmp_path, env=env)
    try:
        assert up.returncode == 0, up.stderr
        recorded = json.loads((tmp_path / ".local" / "services.json").read_text())
        assert recorded["database_url"].endswith("/app") and recorded["s3_bucket"]
        # the local Prefect API that terminal runs of the flow use, and its UI
        with urllib.request.urlopen(recorded["prefect_api_url"] + "/health", timeout=10) as health:
            assert health.status == 200

        applied = run("dbcore.cli", "apply", cwd=tmp_path, env=env)
        assert applied.returncode == 0, applied.stderr
        assert "applied 4 migration(s)" in applied.stdout

        backup = run("dbcore.cli", "backup", "--json", cwd=tmp_path, env=env)
        assert backup.returncode == 0, backup.stderr
        assert json.loads(backup.stdout)["key"].startswith("backups/local/app/")

        again = run("dbcore.services", "up", cwd=tmp_path, env=env)
        assert again.returncode == 0
        reused = json.loads((tmp_path / ".local" / "services.json").read_text())
        assert reused["database_url"] == recorded["database_url"]  # the same cluster, reused
        status = run("dbcore.cli", "status", cwd=tmp_path, env=env)
        assert "up to date" in status.stdout
    finally:
        down = run("dbcore.services", "down", cwd=tmp_path, env=env)
    assert down.returncode == 0 and all(s in down.stdout for s in ("postgres", "s3", "prefect"))
    after = run("dbcore.cli", "status", cwd=tmp_path, env=env)
    assert after.returncode == 2 and "make run" in after.stderr
