"""The rehearsal's copy restored from the backup's own stream while it uploads (real PostgreSQL and SeaweedFS)."""

from __future__ import annotations

import pytest
from helpers import query
from test_backup import fill, fingerprint, leftovers

from dbcore.backup.restore import verify_backup
from dbcore.connection import Target
from dbcore.deploy.rehearsal import backup_into_copy, scratch_target
from dbcore.errors import RehearsalFailed


def _exists(server_url: str, dbname: str) -> bool:
    return bool(query(server_url, "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)))


def test_the_copy_is_the_database_and_the_stored_backup_is_the_same_bytes(target, s3_settings):
    fill(target.url)
    scratch = scratch_target(target, s3_settings, "stream1")
    seen: list[int] = []
    info, seconds = backup_into_copy(target, scratch, s3_settings, restore_progress=seen.append)
    try:
        assert fingerprint(scratch.url) == fingerprint(target.url)
        assert seen and seen[-1] == info.size  # every stored byte went through the restore
        assert seconds > 0
        # what the bucket holds is a whole backup of its own: it downloads, matches and reads back
        assert verify_backup(info.key, s3_settings).sha256 == info.sha256
    finally:
        query(target.with_dbname("postgres").url, f'DROP DATABASE IF EXISTS "{scratch.dbname}" WITH (FORCE)')


def test_a_copy_that_does_not_restore_fails_the_rehearsal_and_stores_nothing(target, s3_settings):
    fill(target.url)
    server = target.with_dbname("postgres").url
    # the copy is made by a role that may create databases but not superuser-only objects: the
    # dump's CREATE EXTENSION stops pg_restore part way, as a server without it would
    query(target.url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    query(server, "DROP ROLE IF EXISTS stream_limited; CREATE ROLE stream_limited LOGIN CREATEDB")
    limited = Target(target.env, target.url.replace("postgres@", "stream_limited@", 1))
    scratch = scratch_target(limited, s3_settings, "stream2")
    try:
        with pytest.raises(RehearsalFailed, match="does not restore into a copy.*live database was not touched"):
            backup_into_copy(target, scratch, s3_settings)
        assert leftovers(s3_settings) == ([], [])  # no object, no unfinished upload
        assert not _exists(server, scratch.dbname)
    finally:
        query(server, f'DROP DATABASE IF EXISTS "{scratch.dbname}" WITH (FORCE)')
        query(server, "DROP ROLE IF EXISTS stream_limited")
