"""`dbmigrate suggest-indexes` on a workload of its own (tests/advise_workload.py): the helpful
indexes are proposed, each with its measured cost change, and none of the others."""

from __future__ import annotations

import json
import uuid

import psycopg2
import pytest
from advise_workload import HELPED, make_workload

from dbcore.advise.report import markdown, text, write_migration
from dbcore.advise.suggest import suggest_indexes
from dbcore.cli.main import main
from dbcore.connection import Env, Target
from dbcore.deploy.scratch import rehearsal_server
from dbcore.migrate.files import discover
from dbcore.settings import Settings


@pytest.fixture(scope="module")
def workload_url(pg_server_url):
    yield from make_workload(pg_server_url)


def _proposed(advice) -> set[str]:
    return {p.candidate.definition.split(" ON ", 1)[1].replace('"', "") for p in advice.proposals}


def test_proposes_the_helpful_indexes_and_none_of_the_others(workload_url, tmp_path):
    target = Target(Env.LOCAL, workload_url)
    settings = Settings(migrations_dir=tmp_path / "migrations", local_dir=tmp_path / ".local")
    advice = suggest_indexes(target, settings, server=rehearsal_server(target, settings))
    assert _proposed(advice) == HELPED
    for p in advice.proposals:
        assert p.helped and all(h.after <= h.before / 2 for h in p.helped)
        assert all(h.share is not None and h.share > 0 for h in p.helped)
        assert p.size_bytes > 0
        assert "inserts" in p.writes
    shown = text(advice, 0.5)
    assert "orders (customer_id)" not in "\n".join(
        line for line in shown.splitlines() if line[:1].isdigit())
    assert "already indexed by orders (customer_id)" in shown
    assert "-> " in markdown(advice, 0.5)
    # the copy was dropped and the target is as it was: no index added, no scratch database left
    assert _indexes(workload_url) == 4
    conn = psycopg2.connect(workload_url)
    with conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                    (target.dbname + "_rehearsal_%",))
        assert cur.fetchone()[0] == 0
    conn.close()


def test_write_makes_a_concurrent_migration_the_runner_applies(workload_url, tmp_path, capsys):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    code = main(["suggest-indexes", "--database-url", workload_url, "--migrations-dir",
                 str(migrations), "--write", "--queries", str(_queries_file(tmp_path))])
    out = capsys.readouterr().out
    assert code == 0, out
    [written] = discover(migrations)
    source = written.path.read_text()
    assert written.name.startswith("001_add_index_")
    assert "atomic = False" in source and "CREATE INDEX CONCURRENTLY" in source
    assert "DROP INDEX CONCURRENTLY IF EXISTS" in source.split("def rollback")[1]
    assert "cost" in source.split('"""')[1]  # the proposal, in the docstring
    assert main(["lint", str(written.path)]) == 0, capsys.readouterr().out
    # it applies (each index built concurrently) and rolls back, on a copy of the workload
    copy_url = _template_copy(workload_url)
    assert main(["apply", "--database-url", copy_url, "--migrations-dir", str(migrations)]) == 0
    assert _indexes(copy_url) == 6
    assert main(["rollback", "--database-url", copy_url, "--migrations-dir", str(migrations)]) == 0
    assert _indexes(copy_url) == 4
    _drop(copy_url)


def _template_copy(url: str) -> str:
    name = f"advise_copy_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{url.rsplit("/", 1)[1]}"')
    admin.close()
    return url.rsplit("/", 1)[0] + "/" + name


def _drop(url: str) -> None:
    admin = psycopg2.connect(url.rsplit("/", 1)[0] + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
    admin.close()


def _indexes(url: str) -> int:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_indexes WHERE schemaname = 'public' "
                        "AND tablename IN ('customers', 'orders', 'flags')")
            return cur.fetchone()[0]
    finally:
        conn.close()


def _queries_file(tmp_path):
    path = tmp_path / "slow.sql"
    path.write_text("SELECT * FROM customers WHERE email = 'user5@example.org';\n"
                    "SELECT * FROM flags WHERE name = 'flag3';\n")
    return path


def test_margin_can_refuse_every_proposal(workload_url, tmp_path):
    target = Target(Env.LOCAL, workload_url)
    settings = Settings(index_min_saving=99.99, local_dir=tmp_path / ".local")
    advice = suggest_indexes(target, settings, server=rehearsal_server(target, settings))
    assert not advice.proposals
    with pytest.raises(Exception, match="no index to propose"):
        write_migration(advice, tmp_path, 0.9999)


def test_copy_url_of_the_target_itself_is_refused(workload_url, capsys):
    code = main(["suggest-indexes", "--database-url", workload_url, "--copy-url", workload_url])
    assert code == 2
    assert "never on the live database" in capsys.readouterr().err
    # the same database under another address is still the target
    other_address = workload_url.replace("127.0.0.1", "localhost")
    assert main(["suggest-indexes", "--database-url", workload_url, "--copy-url", other_address]) == 2
    assert "never on the live database" in capsys.readouterr().err


def test_a_named_copy_is_used_as_it_is_and_json_is_printed(workload_url, capsys):
    copy_url = _template_copy(workload_url)
    try:
        assert main(["suggest-indexes", "--database-url", workload_url, "--copy-url", copy_url,
                     "--format", "json"]) == 0
        proposals = json.loads(capsys.readouterr().out)
        assert {p["index"].split(" ON ", 1)[1] for p in proposals} == HELPED
        assert all(q["cost_after"] < q["cost_before"] / 2 for p in proposals for q in p["queries"])
    finally:
        _drop(copy_url)


MODELS = '''\
import peewee as pw


class Customer(pw.Model):
    email = pw.TextField()
    country = pw.TextField()

    class Meta:
        table_name = "customers"


class Order(pw.Model):
    customer = pw.ForeignKeyField(Customer, column_name="customer_id")
    status = pw.TextField()
    sku = pw.TextField()
    total = pw.DecimalField()

    class Meta:
        table_name = "orders"


class Flag(pw.Model):
    name = pw.TextField()
    enabled = pw.BooleanField()

    class Meta:
        table_name = "flags"


MODELS = [Customer, Order, Flag]
'''

APP = '''\
from shop_models import Customer, Flag, Order


def orders_of_amount(amount):
    return Order.select().where(Order.total == amount)


def customers_in(country):
    return Customer.select().where((Customer.country == country) & (Customer.id > 0))


def flags():
    return Flag.select().order_by(Flag.name)


def orders_with_customers():
    return Order.select().join(Customer, on=(Order.customer == Customer.id))
'''


def test_the_apps_own_queries_are_read_statically(workload_url, tmp_path, monkeypatch):
    (tmp_path / "shop_models.py").write_text(MODELS)
    app = tmp_path / "app"
    app.mkdir()
    (app / "shop.py").write_text(APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    from dbcore.checks.post import load_models

    target = Target(Env.LOCAL, workload_url)
    settings = Settings(local_dir=tmp_path / ".local")
    advice = suggest_indexes(target, settings, server=rehearsal_server(target, settings), app=app,
                             models=load_models("shop_models:MODELS"))
    assert _proposed(advice) == HELPED | {"orders (total)"}
    [total] = [p for p in advice.proposals if p.candidate.columns == ("total",)]
    assert [h.query.source for h in total.helped] == ["app: shop.py:5"]
    assert total.helped[0].share is None  # the app's code has no timings
    # the foreign key is read from the models, and is indexed already
    assert any("orders (customer_id)" in s for s in advice.skipped_existing)


def test_without_pg_stat_statements_it_says_what_to_give(db_url, capsys, tmp_path):
    code = main(["suggest-indexes", "--database-url", db_url])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "pg_stat_statements is not installed" in err and "--queries FILE" in err
    bad = tmp_path / "bad.sql"
    bad.write_text("SELEC oops")
    assert main(["suggest-indexes", "--database-url", db_url, "--queries", str(bad)]) == 2
    assert "is not SQL PostgreSQL can parse" in capsys.readouterr().err


def _state(url: str) -> tuple:
    conn = psycopg2.connect(url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT (SELECT sum(total) FROM orders WHERE sku = 'SKU-42'), "
                        "(SELECT count(*) FROM customers), to_regclass('nope') IS NULL")
            return cur.fetchone()
    finally:
        conn.close()


def test_updates_and_deletes_are_planned_never_run(workload_url, tmp_path):
    queries = tmp_path / "writes.sql"
    queries.write_text("UPDATE orders SET total = 0 WHERE sku = 'SKU-42';\n"
                       "DELETE FROM customers WHERE email = $1;\n"
                       "CREATE TABLE nope (id int);\n")
    before = _state(workload_url)
    target = Target(Env.LOCAL, workload_url)
    settings = Settings(local_dir=tmp_path / ".local")
    advice = suggest_indexes(target, settings, server=rehearsal_server(target, settings),
                             queries_file=queries)
    by_index = {p.candidate.columns: {h.query.source for h in p.helped} for p in advice.proposals}
    assert "writes.sql" in by_index[("sku",)] and "writes.sql" in by_index[("email",)]
    assert any("1 statement(s) of writes.sql" in n for n in advice.notes)
    assert not any("could not be planned" in n for n in advice.notes)
    assert _state(workload_url) == before
