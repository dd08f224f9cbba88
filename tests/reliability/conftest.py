"""The reliability suite: faults (killed processes, a dead tunnel, a stopped S3 server), load
(pgbench writing while the apply waits for a lock), concurrency and bad inputs, against the real
services of tests/conftest.py. Every test asserts what a user would see: the database exactly as
before (or as applied), nothing left behind, one clear line."""

from __future__ import annotations

import pytest
from helpers import apply_pending, query

from dbcore.connection import Target


@pytest.fixture
def app_at_003(target: Target, s3_settings, migrations_dir):
    """Settings of the sample application with 001-003 applied and one project row; 004 pending."""
    cfg = s3_settings.model_copy(update={"migrations_dir": migrations_dir})
    apply_pending(target, cfg, upto="003")
    query(target.url, "INSERT INTO project (name, slug, created_at, updated_at) "
                      "VALUES ('kept', 'kept', now(), now())")
    return cfg
