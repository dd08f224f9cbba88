"""A backup cut off halfway (the tunnel dies, the S3 server stops) or refused (wrong credentials:
see also tests/dbcore/test_backup.py) leaves nothing behind."""

from __future__ import annotations

import pytest
from fixtures_s3 import S3_ACCESS_KEY, S3_SECRET_KEY, leftovers
from helpers import query, random_rows, schema_dump

from dbcore.backup.dump import backup_to_s3
from dbcore.connection import Env, Target
from dbcore.errors import BackupFailed
from dbcore.proxy import open_tunnel
from dbcore.services.seaweed import SeaweedServer
from flows.migrate import migrate


def test_the_tunnel_killed_mid_backup_fails_it_and_leaves_no_object(forwarder_settings, db_url,
                                                                     s3_settings):
    random_rows(db_url, 8)
    cfg = s3_settings.model_copy(update={"proxy_command": forwarder_settings.proxy_command,
                                         "proxy_local_port": 0})
    with open_tunnel(cfg) as tunnel:
        target = tunnel.target_for(Target(Env.PROXY, db_url))

        killed: list[int] = []

        def kill_the_tunnel(done: int) -> None:
            if not killed:
                killed.append(done)
                tunnel.process.kill()
                tunnel.process.wait(10)

        with pytest.raises(BackupFailed, match="pg_dump") as failure:
            backup_to_s3(target, cfg, progress=kill_the_tunnel)
        assert killed, f"the backup failed before the tunnel was killed: {failure.value}"
        assert not tunnel.healthy()
    assert "\n" not in str(failure.value)
    assert leftovers(cfg) == ([], [])


def test_the_s3_server_stopped_mid_upload_leaves_no_object_and_no_multipart_upload(
        target, tmp_path, s3_credentials, settings):
    server = SeaweedServer(tmp_path / "s3", S3_ACCESS_KEY, S3_SECRET_KEY)
    server.start()
    try:
        server.create_bucket("cut")
        cfg = settings.model_copy(update={"s3_bucket": "cut", "s3_endpoint_url": server.endpoint_url,
                                          "backup_zstd_level": 1})
        random_rows(target.url, 24)

        def stop_the_server(done: int) -> None:
            if done > 12 * 2**20 and server.is_running():
                server.stop()

        with pytest.raises(BackupFailed) as failure:
            backup_to_s3(target, cfg, progress=stop_the_server)
        assert server.endpoint_url in str(failure.value) and failure.value.retryable
        server.start()  # same ports: the same endpoint
        objects, uploads = leftovers(cfg)
        assert objects == []  # no object: nothing half-written can be taken for a backup
        # the upload could not be aborted while the server was down: the next backup does it
        info = backup_to_s3(target, cfg)
        assert leftovers(cfg) == ([info.key], [])
    finally:
        server.stop()


def test_s3_refusing_the_credentials_fails_the_run_at_backup_with_nothing_changed(
        flow_env, db_url, app_at_003, monkeypatch):
    wrong = "wrong-secret-" + "5d1c0ffee"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    before = schema_dump(db_url)
    state = migrate(return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed at backup, nothing changed:")
    assert "access denied" in state.message and "AWS_SECRET_ACCESS_KEY" in state.message
    assert wrong not in state.message and S3_SECRET_KEY not in state.message
    assert schema_dump(db_url) == before
    assert query(db_url, "SELECT count(*) FROM pg_database WHERE datname LIKE '%%_rehearsal_%%'") \
        == [(0,)]  # the copy begun beside the backup is gone too
