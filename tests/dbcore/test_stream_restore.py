"""The rehearsal's copy restored from the backup's own stream while it uploads (real PostgreSQL and SeaweedFS)."""

from __future__ import annotations

import pytest
from helpers import apply_pending, query
from test_backup import fill, fingerprint, leftovers

from dbcore.backup.dump import list_backups
from dbcore.backup.restore import verify_backup
from dbcore.connection import Target
from dbcore.deploy import head_start
from dbcore.deploy.rehearsal import backup_into_copy
from dbcore.deploy.scratch import rehearsal_server, scratch_name
from dbcore.errors import RehearsalFailed
from dbcore.migrate.plan import plan_apply


def _exists(server_url: str, dbname: str) -> bool:
    return bool(query(server_url, "SELECT 1 FROM pg_database WHERE datname = %s", (dbname,)))


def test_the_copy_is_the_database_and_the_stored_backup_is_the_same_bytes(target, s3_settings):
    fill(target.url)
    seen: list[int] = []
    info, copy = backup_into_copy(target, rehearsal_server(target, s3_settings), s3_settings,
                                  "5eea0001", restore_progress=seen.append, template=False)
    try:
        assert copy.method == "stream"
        assert fingerprint(copy.target.url) == fingerprint(target.url)
        assert seen and seen[-1] == info.size  # every stored byte went through the restore
        assert copy.seconds > 0
        # what the bucket holds is a whole backup of its own: it downloads, matches and reads back
        assert verify_backup(info.key, s3_settings).sha256 == info.sha256
    finally:
        copy.discard()


def test_a_copy_that_does_not_restore_fails_the_rehearsal_and_stores_nothing(target, s3_settings):
    fill(target.url)
    server = target.with_dbname("postgres").url
    # the copy is made by a role that may create databases but not superuser-only objects: the
    # dump's CREATE EXTENSION stops pg_restore part way, as a server without it would
    query(target.url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    query(server, "DROP ROLE IF EXISTS stream_limited; CREATE ROLE stream_limited LOGIN CREATEDB")
    limited = Target(target.env, target.url.replace("postgres@", "stream_limited@", 1))
    scratch = scratch_name(target.dbname, "5eea0002")
    try:
        with pytest.raises(RehearsalFailed, match="does not restore into a copy.*live database was not touched"):
            backup_into_copy(target, rehearsal_server(limited, s3_settings), s3_settings, "5eea0002",
                             template=False)
        assert leftovers(s3_settings) == ([], [])  # no object, no unfinished upload
        assert not _exists(server, scratch)
    finally:
        query(server, f'DROP DATABASE IF EXISTS "{scratch}" WITH (FORCE)')
        query(server, "DROP ROLE IF EXISTS stream_limited")


def test_a_head_start_is_taken_over_only_for_the_same_plan(target, s3_settings, migrations_dir):
    settings = s3_settings.model_copy(update={"migrations_dir": migrations_dir})
    apply_pending(target, settings, upto="003")
    query(target.url, "INSERT INTO project (name, slug, created_at, updated_at) VALUES ('p', 'p', now(), now())")
    server = rehearsal_server(target, settings)
    head = head_start.begin(target, settings, server)
    plan = plan_apply(target, settings)
    assert head.claim(plan, target)
    assert head.checked is not None and head.checked.stage == "before the backup"
    info, copy = head.outcome()
    try:
        assert query(copy.target.url, "SELECT name FROM project") == [("p",)]  # the data, as it was
        assert verify_backup(info.key, settings).sha256 == info.sha256
    finally:
        copy.discard()

    other = head_start.begin(target, settings, server)
    assert other.planned(timeout=30)
    (migrations_dir / "004_fix_sourcedir_language.py").write_text(
        (migrations_dir / "004_fix_sourcedir_language.py").read_text() + "\n# changed\n")
    assert not other.claim(plan_apply(target, settings), target)  # a file changed: not the same work
    other.discard()
    assert not _exists(target.with_dbname("postgres").url, other.result[1].target.dbname)  # its copy is gone
    # and its backup: an unused head start leaves no object behind (the claimed one's stays)
    assert [b.key for b in list_backups(settings)] == [info.key]
