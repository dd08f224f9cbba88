"""The smaller promises of issue 16: each bad case ends in one line that names the problem and
the fix, or in the obvious behaviour."""

from __future__ import annotations

from helpers import schema_dump

from dbcore.cli.main import main as dbmigrate


def test_a_migration_file_that_is_not_utf8_is_one_line_naming_it(db_url, migrations_dir, monkeypatch,
                                                                   capfd):
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("MIGRATE_MIGRATIONS_DIR", str(migrations_dir))
    (migrations_dir / "005_latin1.py").write_bytes(
        b"# caf\xe9\ndef migrate(migrator, database, *, fake=False):\n    pass\n")
    before = schema_dump(db_url)
    assert dbmigrate(["apply"]) == 1
    err = capfd.readouterr().err.strip()
    assert err.splitlines()[-1] == ("dbmigrate: error: migration 005_latin1.py is not UTF-8 text "
                                    "(byte 0xe9 at line 1): save it as UTF-8; nothing was applied")
    assert "Traceback" not in err and schema_dump(db_url) == before
    assert dbmigrate(["status"]) == 0  # status still lists it, broken
    assert "005_latin1  BROKEN: migration 005_latin1.py is not UTF-8" in capfd.readouterr().out


def test_approve_list_shows_a_fleet_run_waiting_for_its_approval(prefect_api):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Paused

    from flows.approval import Waiting, record_waiting
    from flows.approve import list_paused
    from flows.current import current_flow_run

    @flow(name="migrate-fleet")
    def fleet_look_alike() -> str:
        # what ask_approval stores before it pauses; a retried attempt stores it again
        for _ in range(2):
            record_waiting("f1ee7", Waiting("a fleet of 3 databases (production)",
                                            "fleet of 3 on production: 2 pending"))
        return str(current_flow_run().id)

    @flow(name="migrate-fleet")
    def paused_elsewhere() -> str:  # paused by something that stored nothing beside its pause
        return str(current_flow_run().id)

    run_id, bare_id = fleet_look_alike(), paused_elsewhere()
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run_id, Paused(pause_key="plan-f1ee7-attempt-1-abc"), force=True)
        client.set_flow_run_state(bare_id, Paused(pause_key="plan-0ther-attempt-1-abc"), force=True)
    try:
        listed = list_paused()
    finally:  # no later test of this session may find them waiting
        with get_client(sync_client=True) as client:
            for r in (run_id, bare_id):
                client.set_flow_run_state(r, Cancelled(), force=True)
    [line] = [line for line in listed if run_id in line]
    assert "  target a fleet of 3 databases (production)  paused since " in line
    assert "plan f1ee7" in line and line.endswith("\n    fleet of 3 on production: 2 pending")
    # a run paused without that record (another tool's, an older version's) is listed, target unknown
    [line] = [line for line in listed if bare_id in line]
    assert "target ? (see the run's plan artifact)" in line and "plan 0ther" in line


def test_a_server_going_away_mid_apply_names_the_server_not_the_migration(
        db_url, migrations_dir, monkeypatch, capfd):
    """The server ends the session mid-apply (as a shutdown does: SQLSTATE 57P01): the error says
    the connection to the server was lost, not "fix migrate()"."""
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("MIGRATE_MIGRATIONS_DIR", str(migrations_dir))
    (migrations_dir / "005_server_goes_away.py").write_text(
        "def migrate(migrator, database, *, fake=False):\n"
        "    migrator.sql('SELECT pg_terminate_backend(pg_backend_pid())')\n\n"
        "def rollback(migrator, database, *, fake=False):\n    pass\n")
    assert dbmigrate(["apply"]) == 1
    line = capfd.readouterr().err.strip().splitlines()[-1]
    server = db_url.split("@")[1].split("/")[0]
    assert f"the connection to the database server {server} was lost" in line, line
    assert "fix migrate()" not in line and "check that the server is running" in line


def test_a_ten_thousand_database_targets_file_is_refused_before_anything_is_planned(
        flow_env, tmp_path):
    from flows.fleet import migrate_fleet

    targets = tmp_path / "fleet.yaml"
    targets.write_text("databases:\n" + "".join(
        f"  - {{name: tenant-{i}, url_env: TENANT_{i}_URL}}\n" for i in range(10_000)))
    state = migrate_fleet(env="local", targets=str(targets), return_state=True)
    assert state.is_failed()
    assert state.message == (
        f"failed at configuration, nothing changed: {targets} names 10000 databases, more than the "
        "500 one fleet run takes (each is planned before the approval and runs as its own flow "
        "run): split it into several targets files, or raise MIGRATE_FLEET_MAX_DATABASES")
