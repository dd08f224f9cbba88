"""Fixtures for a real S3-compatible server: one SeaweedFS on 127.0.0.1 per session, a fresh bucket per test."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from pathlib import Path

import boto3
import pytest

from dbcore.services.seaweed import SeaweedServer

S3_ACCESS_KEY = "dbmigrate-test"
#: made up per session; tests check that it never shows in an error or output
S3_SECRET_KEY = "test-secret-" + uuid.uuid4().hex


@pytest.fixture(scope="session")
def s3_server():
    """A running SeaweedFS S3 server for the whole session (its own temp folder, free ports)."""
    root = Path(tempfile.mkdtemp(prefix="dbmigrate-s3-"))
    server = SeaweedServer(root, S3_ACCESS_KEY, S3_SECRET_KEY)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_credentials(monkeypatch, tmp_path):
    """boto3's credential chain set to the test server's keys, never the developer's own ~/.aws."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ENDPOINT_URL",
                "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def s3_bucket(s3_server, s3_credentials) -> str:
    """Name of a fresh, empty bucket on the session's S3 server."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_settings(settings, s3_server, s3_bucket):
    """The test settings pointed at the fresh bucket on the session's S3 server."""
    return settings.model_copy(
        update={"s3_bucket": s3_bucket, "s3_endpoint_url": s3_server.endpoint_url}
    )


def s3_client(settings):
    return boto3.session.Session().client("s3", endpoint_url=settings.s3_endpoint_url,
                                          region_name="us-east-1")


def leftovers(settings) -> tuple[list[str], list[str]]:
    """Objects and unfinished multipart uploads in the bucket."""
    client = s3_client(settings)
    objects = [o["Key"] for o in client.list_objects_v2(Bucket=settings.s3_bucket).get("Contents", [])]
    uploads = [u["Key"] for u in client.list_multipart_uploads(Bucket=settings.s3_bucket).get("Uploads", [])]
    return objects, uploads
