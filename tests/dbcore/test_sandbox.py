"""Code under review in a child process (dbcore/sandbox.py), the plan's inputs and the SQL judge."""

from __future__ import annotations

import os

import pytest

from dbcore.deploy.plan import plan_changes, plan_fingerprint
from dbcore.migrate.files import discover, folder_inputs
from dbcore.migrate.plan import MigrationResult, Plan
from dbcore.migrate.sqlcheck import judged, kind, normalise, shape, sql_digest
from dbcore.sandbox import ChildEnded, child_env, run_in_child

PROD = "postgres://app:s3cret-pw@db.internal:5432/app"


def test_the_child_environment_names_no_database_but_the_copy():
    base = {"DATABASE_URL": PROD, "SHOP_DB": PROD.replace("/app", "/shop"), "HOME": "/root",
            "APP_PASSWORD": "s3cret-pw", "PYTHONPATH": "/app"}
    nothing = child_env(secrets=["s3cret-pw"], base=base)
    assert nothing == {"HOME": "/root", "PYTHONPATH": "/app"}
    copy = "postgres://app:x@127.0.0.1:5432/app_rehearsal_1"
    pointed = child_env(database_url=copy, secrets=["s3cret-pw"], base=base)
    assert pointed == {"HOME": "/root", "PYTHONPATH": "/app", "DATABASE_URL": copy, "SHOP_DB": copy}


def test_a_child_answers_raises_and_dies_as_told():
    env = {**os.environ, "SEEN": "yes"}
    assert run_in_child(os.getenv, "SEEN", env=env, what="a read") == "yes"
    with pytest.raises(ValueError):
        run_in_child(int, "not a number", env=env, what="a parse")
    with pytest.raises(ChildEnded) as ended:
        run_in_child(os._exit, 3, env=env, what="the work")
    assert str(ended.value) == "the work exited with code 3 (os._exit, or a crash)"


def test_statements_are_normalised_and_judged():
    assert normalise('SAVEPOINT "s1f2e3"') == normalise('SAVEPOINT "s9a8b7"') == "SAVEPOINT sp"
    assert normalise("UPDATE t SET a = %s -- params: [1]") == "UPDATE t SET a = %s"
    assert kind("ALTER TABLE t ADD COLUMN b int") == "schema"
    assert kind("RELEASE SAVEPOINT sp") == "control"
    assert shape("DELETE FROM t WHERE id IN (%s, %s, %s)") == shape("DELETE FROM t WHERE id IN (%s)")
    assert shape("UPDATE t SET a = 'x' WHERE id = 4") == shape("UPDATE t SET a = 'y' WHERE id = 9")
    one = [MigrationResult("005_x", 0.1, ("ALTER TABLE t ADD b int", "UPDATE t SET b = %s -- params: [1]"))]
    many = [MigrationResult("005_x", 0.2, ("ALTER TABLE t ADD b int",) + ("UPDATE t SET b = %s -- params: [2]",) * 3)]
    assert sql_digest(one) == sql_digest(many)  # data statements: their shape, not their number
    assert judged(one[0].sql)[0] == ["ALTER TABLE t ADD b int"]
    other = [MigrationResult("005_x", 0.1, ("ALTER TABLE t ADD c int",))]
    assert sql_digest(other) != sql_digest(one)


def test_every_file_of_the_folder_is_in_the_fingerprint(migrations_dir):
    (migrations_dir / "sql").mkdir()
    (migrations_dir / "sql" / "006_up.sql").write_text("SELECT 1")
    (migrations_dir / "__pycache__").mkdir(exist_ok=True)
    (migrations_dir / "__pycache__" / "x.pyc").write_bytes(b"\0")
    inputs = folder_inputs(migrations_dir)
    assert ("migrations/sql/006_up.sql" in dict(inputs)) and not any("pycache" in p for p, _ in inputs)
    plan = Plan("apply", "postgres://h/db", (), tuple(discover(migrations_dir)), inputs=inputs)
    (migrations_dir / "sql" / "006_up.sql").write_text("DROP TABLE project")
    again = Plan("apply", "postgres://h/db", (), tuple(discover(migrations_dir)),
                 inputs=folder_inputs(migrations_dir))
    assert plan_fingerprint(plan, "k") != plan_fingerprint(again, "k")
    assert plan_changes(plan, again) == "migrations/sql/006_up.sql changed"


def test_the_plan_says_when_the_copy_was_on_the_production_cluster():
    from dbcore.deploy.plan import ON_PRODUCTION_CLUSTER, DeployPlan
    from dbcore.deploy.rehearsal import RehearsalReport
    from dbcore.lint.report import LintReport

    plan = Plan("apply", "postgres://app@db/app", (), ())
    for on_production, said in ((True, True), (False, False)):
        rehearsal = RehearsalReport("app_rehearsal_1", "k", 0.1, (), None,
                                    server="the production cluster itself",
                                    on_production_cluster=on_production)
        deploy = DeployPlan("production", plan, LintReport(()), None, rehearsal)
        assert (ON_PRODUCTION_CLUSTER in deploy.to_markdown()) is said
        assert (ON_PRODUCTION_CLUSTER in deploy.text()) is said
