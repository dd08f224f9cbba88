"""Fixtures of the flow tests (tests/flows, tests/reliability): Prefect's ephemeral API (one per
session), and the environment of a developer running the flow against real PostgreSQL and SeaweedFS."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def prefect_api():
    """A temporary Prefect API for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def flow_env(monkeypatch, db_url, s3_settings, migrations_dir, prefect_api):
    """The environment a developer has when running `python flows/migrate.py --env local`."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("MIGRATE_S3_BUCKET", s3_settings.s3_bucket)
    monkeypatch.setenv("MIGRATE_S3_ENDPOINT_URL", s3_settings.s3_endpoint_url)
    monkeypatch.setenv("MIGRATE_MIGRATIONS_DIR", str(migrations_dir))
    monkeypatch.setenv("MIGRATE_MODELS", "dbcore.models:MODELS")  # the sample app's
    monkeypatch.setenv("MIGRATE_ADVISORY_LOCK_WAIT", "5")
    return s3_settings.model_copy(update={"migrations_dir": migrations_dir})
