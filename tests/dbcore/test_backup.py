"""Backups against a real PostgreSQL 15 and a real SeaweedFS S3 server on 127.0.0.1."""

from __future__ import annotations

import json
import time
import uuid

import psycopg2
import pytest
from fixtures_s3 import S3_ACCESS_KEY, S3_SECRET_KEY, leftovers, s3_client
from helpers import query, schema_dump

from dbcore.backup.dump import backup_to_s3, list_backups, prune_backups
from dbcore.backup.pgtools import find_pg_tool
from dbcore.backup.restore import restore_backup, verify_backup
from dbcore.cli import main as cli
from dbcore.connection import Env, Target
from dbcore.errors import (
    BackupCorrupt,
    BackupFailed,
    BackupNotFound,
    ConfigError,
    RestoreRefused,
    ToolNotFound,
)
from dbcore.services.seaweed import SeaweedServer

SAMPLE_SQL = """
CREATE TABLE customers (
    id serial PRIMARY KEY, name text NOT NULL, email text UNIQUE, created_at timestamptz DEFAULT now()
);
INSERT INTO customers (name, email)
    SELECT 'customer ' || g, 'c' || g || '@example.com' FROM generate_series(1, 2000) g;
CREATE TABLE orders (
    id bigserial PRIMARY KEY, customer_id int NOT NULL REFERENCES customers (id),
    total numeric(10, 2), note text, payload bytea
);
INSERT INTO orders (customer_id, total, note, payload)
    SELECT 1 + g % 2000, (g * 1.37)::numeric(10, 2), repeat('x', g % 40), decode(md5(g::text), 'hex')
    FROM generate_series(1, 30000) g;
CREATE INDEX orders_customer ON orders (customer_id);
CREATE TABLE events (id int, data jsonb);
INSERT INTO events SELECT g, jsonb_build_object('n', g, 'tag', 'ev' || g % 7) FROM generate_series(1, 5000) g;
CREATE VIEW big_orders AS SELECT * FROM orders WHERE total > 1000;
CREATE TABLE migratehistory (id serial PRIMARY KEY, name varchar(255) NOT NULL, migrated_at timestamp);
INSERT INTO migratehistory (name, migrated_at) VALUES ('001_initial', now()), ('002_add_orders', now());
"""


def fill(url: str) -> None:
    query(url, SAMPLE_SQL)


def fingerprint(url: str) -> dict[str, tuple[int, str]]:
    """Row count and an md5 over every row of every table, by table name."""
    tables = [name for (name,) in query(
        url, "SELECT table_name FROM information_schema.tables "
             "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY 1")]
    return {
        t: tuple(query(url, f'SELECT count(*), md5(coalesce(string_agg(x::text, \'|\' '
                            f'ORDER BY x::text), \'\')) FROM "{t}" x')[0])
        for t in tables
    }




def test_backup_then_restore_into_a_new_database_gives_identical_data(target, s3_settings):
    fill(target.url)
    seen: list[int] = []
    info = backup_to_s3(target, s3_settings, progress=seen.append)

    assert info.key.startswith(f"backups/local/{target.dbname}/")
    assert info.key.endswith("_002_add_orders.dump")
    assert (info.last_migration, info.database, info.env) == ("002_add_orders", target.dbname, "local")
    assert info.compression == "zstd:1" and info.pg_dump_version.startswith("15.")
    assert seen and seen == sorted(seen)
    meta = s3_client(s3_settings).head_object(Bucket=info.bucket, Key=info.key)
    assert meta["ContentLength"] == info.size
    assert meta["Metadata"]["sha256"] == info.sha256
    assert meta["Metadata"]["last-migration"] == "002_add_orders"

    into = target.with_dbname(target.dbname + "_copy")
    report = restore_backup(info.key, into, s3_settings)
    try:
        assert report.created_database
        assert fingerprint(into.url) == fingerprint(target.url)
        assert fingerprint(into.url)["orders"][0] == 30000
        assert schema_dump(into.url) == schema_dump(target.url)
    finally:
        _drop(into)

    verified = verify_backup(info.key, s3_settings)
    assert verified.sha256 == info.sha256 and verified.toc_entries > 5


def _drop(target: Target) -> None:
    conn = psycopg2.connect(target.with_dbname("postgres").url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{target.dbname}" WITH (FORCE)')
    conn.close()


def test_tampered_backup_is_refused_and_the_target_is_untouched(target, make_database, s3_settings):
    fill(target.url)
    info = backup_to_s3(target, s3_settings)
    client = s3_client(s3_settings)
    stored = client.get_object(Bucket=info.bucket, Key=info.key)
    body = bytearray(stored["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=info.bucket, Key=info.key, Body=bytes(body), Metadata=stored["Metadata"])

    victim = Target(Env.LOCAL, make_database())
    query(victim.url, "CREATE TABLE keep (id int); INSERT INTO keep SELECT generate_series(1, 10)")
    before = fingerprint(victim.url)
    with pytest.raises(BackupCorrupt, match="corrupt|cannot be decompressed"):
        restore_backup(info.key, victim, s3_settings, force=True)
    assert fingerprint(victim.url) == before
    with pytest.raises(BackupCorrupt):
        verify_backup(info.key, s3_settings)


def test_restore_into_a_non_empty_database_needs_force(target, make_database, s3_settings):
    fill(target.url)
    info = backup_to_s3(target, s3_settings)
    other = Target(Env.LOCAL, make_database())
    query(other.url, "CREATE TABLE orders (id int); INSERT INTO orders VALUES (1)")

    with pytest.raises(RestoreRefused, match="not empty.*--force"):
        restore_backup(info.key, other, s3_settings)
    assert query(other.url, "SELECT count(*) FROM orders") == [(1,)]

    report = restore_backup(info.key, other, s3_settings, force=True)
    assert report.forced
    assert fingerprint(other.url) == fingerprint(target.url)


@pytest.mark.parametrize("env", [Env.PRODUCTION, Env.PROXY])
def test_restore_refuses_production_unless_allowed(target, make_database, s3_settings, env):
    fill(target.url)
    info = backup_to_s3(target, s3_settings)
    live = Target(env, make_database())
    query(live.url, "CREATE TABLE orders (id int); INSERT INTO orders VALUES (1)")
    with pytest.raises(RestoreRefused, match=f"{env} database.*--allow-production"):
        restore_backup(info.key, live, s3_settings, force=True)
    assert query(live.url, "SELECT count(*) FROM orders") == [(1,)]
    restore_backup(info.key, live, s3_settings, force=True, allow_production=True)
    assert fingerprint(live.url) == fingerprint(target.url)


def test_a_database_with_only_functions_and_types_is_not_empty(target, make_database, s3_settings):
    fill(target.url)
    info = backup_to_s3(target, s3_settings)
    other = Target(Env.LOCAL, make_database())
    query(other.url, "CREATE SCHEMA app; CREATE TYPE app.mood AS ENUM ('ok'); "
                     "CREATE FUNCTION app.f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
    with pytest.raises(RestoreRefused, match="not empty"):
        restore_backup(info.key, other, s3_settings)


def test_missing_backup_is_reported(target, s3_settings):
    with pytest.raises(BackupNotFound, match="dbmigrate backups"):
        restore_backup("backups/local/x/nothing.dump", target, s3_settings)


def test_stopped_s3_fails_fast_and_leaves_nothing(target, tmp_path, s3_credentials, settings):
    server = SeaweedServer(tmp_path / "s3", S3_ACCESS_KEY, S3_SECRET_KEY)
    server.start()
    try:
        server.create_bucket("stopped")
        cfg = settings.model_copy(update={"s3_bucket": "stopped",
                                          "s3_endpoint_url": server.endpoint_url})
        fill(target.url)
        server.stop()
        started = time.monotonic()
        with pytest.raises(BackupFailed, match="unreachable") as failure:
            backup_to_s3(target, cfg)
        assert time.monotonic() - started < 10
        assert server.endpoint_url in str(failure.value)
        assert failure.value.retryable  # the flow may try again: nothing was left behind
        server.start()  # same ports: the same endpoint
        assert leftovers(cfg) == ([], [])
    finally:
        server.stop()


def test_interrupted_backup_aborts_its_upload(target, s3_settings):
    fill(target.url)

    def interrupt(done: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        backup_to_s3(target, s3_settings, progress=interrupt)
    assert leftovers(s3_settings) == ([], [])


def test_pg_dump_error_is_reported_with_its_stderr(target, s3_settings):
    fill(target.url)
    role = f"reader_{uuid.uuid4().hex[:8]}"
    # it may read the migration history, but pg_dump will find tables it may not read
    query(target.url, f'CREATE ROLE "{role}" LOGIN; GRANT SELECT ON migratehistory TO "{role}"')
    try:
        weak = Target(Env.LOCAL, target.url.replace("postgres@", f"{role}@"))
        with pytest.raises(BackupFailed, match="pg_dump .* permission denied for table"):
            backup_to_s3(weak, s3_settings)
        assert leftovers(s3_settings) == ([], [])
    finally:
        query(target.url, f'DROP OWNED BY "{role}"; DROP ROLE "{role}"')


def test_wrong_credentials_give_a_clear_error_without_the_secret(target, s3_settings, monkeypatch):
    wrong_secret = "wrong-" + uuid.uuid4().hex
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with pytest.raises(BackupFailed, match="access denied.*AWS_SECRET_ACCESS_KEY") as failure:
        backup_to_s3(target, s3_settings)
    assert wrong_secret not in str(failure.value)
    assert S3_SECRET_KEY not in str(failure.value)
    assert not failure.value.retryable  # repeating cannot help: the fix is the credentials

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(BackupFailed, match="access denied") as failure:
        backup_to_s3(target, s3_settings)
    assert wrong_secret not in str(failure.value)


def test_missing_bucket_is_named(target, s3_settings):
    cfg = s3_settings.model_copy(update={"s3_bucket": "no-such-bucket-here"})
    with pytest.raises(BackupFailed, match="bucket no-such-bucket-here does not exist"):
        backup_to_s3(target, cfg)


def test_prune_keeps_the_newest_n_of_each_database(target, make_database, s3_settings):
    query(target.url, "CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
    other = Target(Env.LOCAL, make_database())
    keys = [backup_to_s3(target, s3_settings).key for _ in range(4)]
    other_key = backup_to_s3(other, s3_settings).key

    listed = list_backups(s3_settings, database=target.dbname)
    assert [b.key for b in listed] == keys[::-1]  # newest first
    assert [b.key for b in list_backups(s3_settings, env="local", database=target.dbname)] == keys[::-1]

    deleted = prune_backups(s3_settings, keep=2)
    assert sorted(deleted) == sorted(keys[:2])
    assert [b.key for b in list_backups(s3_settings)] == [other_key, *keys[:1:-1]]
    with pytest.raises(ConfigError):
        prune_backups(s3_settings, keep=0)


def test_cli_backup_json_then_verify_restore_and_list(target, s3_settings, monkeypatch, capsys):
    fill(target.url)
    monkeypatch.setenv("MIGRATE_S3_BUCKET", s3_settings.s3_bucket)
    monkeypatch.setenv("MIGRATE_S3_ENDPOINT_URL", s3_settings.s3_endpoint_url)
    monkeypatch.setenv("DATABASE_URL", target.url)

    assert cli.main(["backup", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"key", "size", "sha256"} <= out.keys() and out["size"] > 0

    assert cli.main(["verify", out["key"]]) == 0
    assert out["sha256"] in capsys.readouterr().out

    copy = target.dbname + "_cli"
    try:
        assert cli.main(["restore", out["key"], "--into", copy]) == 0
        assert fingerprint(target.with_dbname(copy).url) == fingerprint(target.url)
        assert cli.main(["restore", out["key"], "--into", copy]) == 1
        assert "not empty" in capsys.readouterr().err
    finally:
        _drop(target.with_dbname(copy))

    assert cli.main(["backups", "--json"]) == 0
    assert [b["key"] for b in json.loads(capsys.readouterr().out)] == [out["key"]]


def test_cli_errors_are_one_line_without_the_secret(target, s3_settings, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DATABASE_URL", target.url)
    monkeypatch.setenv("MIGRATE_LOCAL_DIR", str(tmp_path / "nothing-running"))
    assert cli.main(["backup"]) == 2
    assert "set MIGRATE_S3_BUCKET" in capsys.readouterr().err

    monkeypatch.setenv("MIGRATE_S3_BUCKET", s3_settings.s3_bucket)
    monkeypatch.setenv("MIGRATE_S3_ENDPOINT_URL", s3_settings.s3_endpoint_url)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaky-" + uuid.uuid4().hex)
    assert cli.main(["backup", "--json"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and "access denied" in captured.err
    assert "leaky-" not in captured.err and S3_SECRET_KEY not in captured.err


def test_pg_tool_older_than_the_server_is_refused_newer_is_used():
    with pytest.raises(ToolNotFound, match=r"PostgreSQL 99 .*every pg_dump found is older"
                                           r".* is 15\.\d+.*postgresql-client-99"):
        find_pg_tool("pg_dump", 99)
    assert find_pg_tool("pg_restore", 15).major == 15
    # a newer client dumps and restores older servers
    assert find_pg_tool("pg_dump", 13).major == 15 and find_pg_tool("pg_restore", 12).major == 15


def test_running_s3_server_is_found_by_another_process(s3_server):
    again = SeaweedServer(s3_server.root, S3_ACCESS_KEY, S3_SECRET_KEY)
    assert again.is_running()
    assert again.endpoint_url == s3_server.endpoint_url
    again.start()  # adopts the running one rather than starting a second
    assert again.pid == s3_server.pid
