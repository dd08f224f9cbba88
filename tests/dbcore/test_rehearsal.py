"""Where the rehearsal copy is made, how, and what crashed runs left behind."""

from __future__ import annotations

import psycopg2
import pytest
from helpers import apply_pending, query
from pydantic import SecretStr

from dbcore.backup.dump import backup_to_s3
from dbcore.connection import Env, Target
from dbcore.deploy.plan import DeployPlan
from dbcore.deploy.rehearsal import backup_into_copy, rehearse_on_copy
from dbcore.deploy.scratch import rehearsal_server, scratch_name
from dbcore.errors import ConfigError, RehearsalFailed
from dbcore.lint.engine import lint_pending
from dbcore.migrate.plan import plan_apply

SCRATCH = "SELECT datname FROM pg_database WHERE datname LIKE '%%\\_rehearsal\\_%%' ORDER BY 1"


@pytest.fixture
def staged(target, s3_settings, migrations_dir):
    """The sample app up to 003, its backup, and the plan of 004."""
    cfg = s3_settings.model_copy(update={"migrations_dir": migrations_dir})
    apply_pending(target, cfg, upto="003")
    return cfg, backup_to_s3(target, cfg), plan_apply(target, cfg)


def test_each_environment_has_its_rehearsal_server(settings, db_url, other_pg_server_url):
    local = Target(Env.LOCAL, db_url)
    assert rehearsal_server(local, settings).on_target
    proxy = Target(Env.PROXY, "postgres://u:pw@127.0.0.1:15432/app")
    with pytest.raises(ConfigError, match="embedded cluster"):
        rehearsal_server(proxy, settings)
    laptop = rehearsal_server(proxy, settings, other_pg_server_url)
    assert not laptop.on_target and "embedded local cluster" in laptop.where
    production = Target(Env.PRODUCTION, "postgres://u:pw@db.internal:5432/app")
    with pytest.raises(ConfigError, match="MIGRATE_REHEARSAL_DATABASE_URL.*MIGRATE_REHEARSAL_ON_TARGET=1"):
        rehearsal_server(production, settings)
    on_target = rehearsal_server(production, settings.model_copy(update={"rehearsal_on_target": True}))
    assert on_target.on_target and on_target.admin.url.endswith("db.internal:5432/postgres")
    named = settings.model_copy(update={"rehearsal_database_url": SecretStr(other_pg_server_url)})
    for where in (local, proxy, production):
        server = rehearsal_server(where, named)
        assert server.admin.url == other_pg_server_url and not server.on_target


def test_locally_the_copy_is_a_template_when_nobody_else_is_connected(target, staged, db_url):
    cfg, _, plan = staged
    server = rehearsal_server(target, cfg)
    info, copy = backup_into_copy(target, server, cfg, "aaaaaaaa1111")
    report = rehearse_on_copy(plan, target, cfg, info.key, copy=copy)
    assert report.method == "template" and "own cluster" in report.server
    assert report.results[0].name == "004_fix_sourcedir_language"
    text = DeployPlan("local", plan, lint_pending(cfg.migrations_dir, []), info, report).to_markdown()
    assert "CREATE DATABASE ... TEMPLATE" in text and "the target's own cluster" in text
    assert "pg_restore read the stored bytes back whole" in text

    app = psycopg2.connect(db_url, application_name="the app")  # now someone is connected
    try:
        info, copy = backup_into_copy(target, server, cfg, "bbbbbbbb2222")
    finally:
        app.close()
    report = rehearse_on_copy(plan, target, cfg, info.key, copy=copy)
    assert report.method == "stream"  # restored from the backup's own stream instead
    text = DeployPlan("local", plan, lint_pending(cfg.migrations_dir, []), info, report).to_markdown()
    assert "from its own stream as it uploaded" in text
    assert query(db_url, SCRATCH) == []


def test_a_named_rehearsal_server_gets_the_copy(target, staged, db_url, other_pg_server_url):
    cfg, backup, plan = staged
    cfg = cfg.model_copy(update={"rehearsal_database_url": SecretStr(other_pg_server_url)})
    report = rehearse_on_copy(plan, target, cfg, backup.key, run_id="cccccccc3333")
    assert report.method == "restore" and "MIGRATE_REHEARSAL_DATABASE_URL" in report.server
    assert query(other_pg_server_url, SCRATCH) == []
    info, copy = backup_into_copy(target, rehearsal_server(target, cfg), cfg, "cccccccc4444")
    assert copy.method == "stream" and copy.target.url.startswith(other_pg_server_url.rsplit("/", 1)[0])
    report = rehearse_on_copy(plan, target, cfg, info.key, copy=copy)
    assert report.ok
    assert query(other_pg_server_url, SCRATCH) == []


def test_leftovers_of_a_crashed_run_are_dropped_and_only_those(target, staged, db_url):
    cfg, backup, plan = staged
    admin = db_url.rsplit("/", 1)[0] + "/postgres"
    dead = scratch_name(target.dbname, "deadbeef")
    busy = scratch_name(target.dbname, "0badcafe")
    not_ours = [f"{target.dbname}_rehearsal_by_hand", f"other_rehearsal_{dead[-8:]}"]
    for name in [dead, busy, *not_ours]:
        query(admin, f'CREATE DATABASE "{name}"')
    user = psycopg2.connect(db_url.rsplit("/", 1)[0] + "/" + busy, application_name="someone")
    try:
        report = rehearse_on_copy(plan, target, cfg, backup.key, run_id="dddddddd4444")
    finally:
        user.close()
    assert report.leftovers.dropped == (dead,)
    assert [name for name, _ in report.leftovers.kept] == [busy]
    assert "in use by pid" in report.leftovers.kept[0][1] and "someone" in report.leftovers.kept[0][1]
    text = DeployPlan("local", plan, lint_pending(cfg.migrations_dir, []), backup, report).to_markdown()
    assert f"dropped scratch database `{dead}`, left by an earlier run" in text
    left = [r[0] for r in query(admin, "SELECT datname FROM pg_database")]
    assert dead not in left and busy in left and all(n in left for n in not_ours)
    for name in [busy, *not_ours]:
        query(admin, f'DROP DATABASE "{name}"')


def test_a_named_server_that_is_the_production_cluster_itself_is_refused(staged, db_url,
                                                                        pg_server_url):
    cfg, backup, plan = staged
    cfg = cfg.model_copy(update={"rehearsal_database_url": SecretStr(pg_server_url)})
    production = Target(Env.PRODUCTION, db_url)  # the same cluster, named as another server
    with pytest.raises(RehearsalFailed, match="is the production cluster itself.*"
                                              "MIGRATE_REHEARSAL_ON_TARGET=1"):
        rehearse_on_copy(plan, production, cfg, backup.key, run_id="eeeeeeee5555")
    assert query(db_url, SCRATCH) == []
