"""Schema drift and post-checks on a real PostgreSQL: models vs the live database."""

from __future__ import annotations

import json

import peewee as pw
import pytest
from helpers import apply_pending, query
from playhouse.postgres_ext import ArrayField, BinaryJSONField, DateTimeTZField

from dbcore.checks.drift import pg_type_name, schema_drift
from dbcore.checks.post import check_no_invalid_indexes, drift_before, load_models, run_post_checks
from dbcore.cli import main as cli
from dbcore.connection import connect, connect_raw
from dbcore.models import MODELS


@pytest.fixture
def app_db(target):
    """The sample models' tables, created by peewee itself, in a fresh database."""
    db = connect(target)
    with db.bind_ctx(MODELS):
        db.create_tables(MODELS)
    db.close()
    return target


def _run(target, sql: str) -> None:
    conn = connect_raw(target)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def test_models_created_by_peewee_have_no_drift(app_db):
    report = schema_drift(app_db, MODELS)
    assert report.ok, report.text()
    assert report.tables == ("document", "project", "sourcedir")
    assert "schema matches the models (3 tables)" in report.text()


def test_sample_migrations_build_exactly_the_models(target, settings, migrations_dir):
    """models.py and migrations/ agree: what 001-004 build is what the models describe."""
    assert settings.migrations_dir == migrations_dir
    apply_pending(target, settings)
    report = schema_drift(target, MODELS)
    assert report.ok, report.text()


@pytest.mark.parametrize("sql, kind, table, where, expected, actual", [
    ("ALTER TABLE document DROP COLUMN filename",
     "missing_column", "document", "filename", "character varying(500) NOT NULL", None),
    ("ALTER TABLE document ADD COLUMN extra integer",
     "extra_column", "document", "extra", None, "integer NULL"),
    ("ALTER TABLE document ALTER COLUMN filename TYPE text",
     "type_mismatch", "document", "filename", "character varying(500)", "text"),
    ("ALTER TABLE project ALTER COLUMN slug TYPE varchar(100)",
     "type_mismatch", "project", "slug", "character varying(200)", "character varying(100)"),
    ("ALTER TABLE sourcedir ALTER COLUMN language DROP NOT NULL",
     "nullability_mismatch", "sourcedir", "language", "NOT NULL", "NULL"),
    ("ALTER TABLE project ALTER COLUMN slug SET NOT NULL",
     "nullability_mismatch", "project", "slug", "NULL", "NOT NULL"),
    ("DROP INDEX sourcedir_project_id_path_language",
     "missing_index", "sourcedir", "sourcedir_project_id_path_language",
     "UNIQUE (project_id, path, language)", None),
    ("DROP INDEX project_slug; CREATE INDEX project_slug ON project (slug)",
     "index_mismatch", "project", "project_slug", "UNIQUE (slug)", "(slug)"),
    ("CREATE INDEX document_filename ON document (filename)",
     "extra_index", "document", "document_filename", None, "(filename)"),
    # a second index on the FK's columns is not hidden by the FK's own index
    ("CREATE UNIQUE INDEX sourcedir_project_once ON sourcedir (project_id)",
     "extra_index", "sourcedir", "sourcedir_project_once", None, "UNIQUE (project_id)"),
    ("CREATE INDEX document_named ON document (filename) WHERE filename <> ''",
     "extra_index", "document", "document_named", None,
     "(filename) WHERE ((filename)::text <> ''::text)"),
    ("DROP INDEX project_slug; CREATE UNIQUE INDEX project_slug ON project (slug) "
     "WHERE slug IS NOT NULL", "index_mismatch", "project", "project_slug", "UNIQUE (slug)",
     "UNIQUE (slug) WHERE (slug IS NOT NULL)"),
    ("CREATE INDEX document_lower ON document (lower(filename))",
     "extra_index", "document", "document_lower", None, "(expressions)"),
    ("CREATE TABLE stray (id integer)", "extra_table", "stray", None, None, None),
    ("DROP TABLE document", "missing_table", "document", None, None, None),
])
def test_each_kind_of_drift_is_reported(app_db, sql, kind, table, where, expected, actual):
    _run(app_db, sql)
    report = schema_drift(app_db, MODELS)
    assert not report.ok
    assert len(report.differences) == 1, report.text()
    diff = report.differences[0]
    assert (diff.kind, diff.table, diff.expected, diff.actual) == (kind, table, expected, actual)
    assert where in (diff.column, diff.index)
    assert table in report.text() and kind in report.text()


def test_several_differences_render_as_json_and_markdown(app_db):
    _run(app_db, "ALTER TABLE document DROP COLUMN content; ALTER TABLE document ADD COLUMN body text")
    report = schema_drift(app_db, MODELS)
    kinds = sorted(d.kind for d in report.differences)
    assert kinds == ["extra_column", "missing_column"]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False
    assert {d["column"] for d in data["differences"]} == {"content", "body"}
    assert all(d["message"] for d in data["differences"])
    markdown = report.to_markdown()
    assert markdown.startswith("### Schema drift: 2 difference(s)")
    assert "| missing_column | document | content | text NOT NULL |  |" in markdown


class Tagged(pw.Model):
    """Indexes the drift check cannot compare with the catalog: skipped with a note, never drift."""

    name = pw.CharField()

    class Meta:
        table_name = "tagged"


Tagged.add_index(Tagged.index(pw.fn.lower(Tagged.name), name="tagged_lower_name"))
Tagged.add_index(Tagged.index(Tagged.name, name="tagged_named", where=(Tagged.name != "")))
Tagged.add_index(pw.SQL('CREATE INDEX "tagged_name_hash" ON "tagged" USING hash ("name")'))


def test_expression_partial_and_raw_sql_indexes_are_notes_not_drift(target):
    db = connect(target)
    try:
        with db.bind_ctx([Tagged]):
            db.create_tables([Tagged])
        report = schema_drift(db, [Tagged])
        assert report.ok, report.text()
        assert len(report.notes) == 3
        assert any("tagged_lower_name" in n and "expression" in n for n in report.notes)
        assert any("tagged_named" in n and "partial" in n for n in report.notes)
        assert any("tagged_name_hash" in n and "raw SQL" in n for n in report.notes)
        assert "note: " in report.text() and "Notes" in report.to_markdown()
        assert report.to_dict()["notes"] == list(report.notes)
        # an extra expression index next to them is noted as possibly theirs, not drift
        db.execute_sql("CREATE INDEX tagged_upper ON tagged (upper(name))")
        report = schema_drift(db, [Tagged])
        assert report.ok and any("tagged_upper" in n for n in report.notes)
        # a plain index the model does not have still is drift
        db.execute_sql("CREATE INDEX tagged_plain ON tagged (name)")
        assert [d.index for d in schema_drift(db, [Tagged]).differences] == ["tagged_plain"]
    finally:
        db.close()


class Everything(pw.Model):
    """One field of each kind peewee maps for PostgreSQL, to check the type mapping."""

    big = pw.BigAutoField()
    small = pw.SmallIntegerField()
    integer = pw.IntegerField(null=True)
    big_int = pw.BigIntegerField()
    flag = pw.BooleanField()
    real = pw.FloatField()
    double = pw.DoubleField()
    money = pw.DecimalField(max_digits=10, decimal_places=3)
    code = pw.FixedCharField(max_length=3)
    name = pw.CharField()
    body = pw.TextField()
    blob = pw.BlobField()
    uuid = pw.UUIDField()
    day = pw.DateField()
    clock = pw.TimeField()
    stamp = pw.DateTimeField()
    stamp_tz = DateTimeTZField()
    data = BinaryJSONField(index=False)
    tags = ArrayField(pw.CharField, index=False)
    ip = pw.IPField()

    class Meta:
        table_name = "everything"


def test_every_peewee_field_type_maps_to_what_postgres_reports(target):
    db = connect(target)
    try:
        with db.bind_ctx([Everything]):
            db.create_tables([Everything])
        report = schema_drift(db, [Everything])
    finally:
        db.close()
    assert report.ok, report.text()


@pytest.mark.parametrize("ddl, pg", [
    ("VARCHAR(200)", "character varying(200)"), ("SERIAL", "integer"), ("BIGSERIAL", "bigint"),
    ("TIMESTAMP", "timestamp without time zone"), ("NUMERIC(10, 5)", "numeric(10,5)"),
    ("VARCHAR(255)[]", "character varying(255)[]"), ("JSONB", "jsonb"), ("CITEXT", "citext"),
])
def test_pg_type_name(ddl, pg):
    assert pg_type_name(ddl) == pg


def test_an_invalid_index_fails_the_post_checks(app_db):
    _run(app_db, "INSERT INTO project (name, created_at, updated_at) VALUES ('a', now(), now());"
                 "INSERT INTO sourcedir (project_id, path, language, created_at, updated_at) "
                 "SELECT id, 'same', l, now(), now() FROM project, (VALUES ('el'), ('en')) AS v(l)")
    # a concurrent unique build over duplicates fails and leaves the index behind, invalid
    with pytest.raises(Exception, match="could not create unique index"):
        _run(app_db, "CREATE UNIQUE INDEX CONCURRENTLY sourcedir_path ON sourcedir (path)")
    db = connect(app_db)
    try:
        invalid = check_no_invalid_indexes(db)
    finally:
        db.close()
    assert [(i.table, i.index) for i in invalid] == [("sourcedir", "sourcedir_path")]
    report = run_post_checks(app_db, MODELS)
    assert not report.ok
    assert "DROP INDEX public.sourcedir_path" in report.text()
    assert "### Invalid indexes" in report.to_markdown()
    assert report.to_dict()["invalid_indexes"][0]["index"] == "sourcedir_path"


def test_post_checks_pass_on_a_clean_database_and_leave_an_open_connection_open(app_db):
    db = connect(app_db)
    try:
        report = run_post_checks(db, MODELS)
        assert not db.is_closed()
    finally:
        db.close()
    assert report.ok
    assert report.invalid_indexes == ()
    assert "## Post-checks passed" in report.to_markdown()


def test_cli_check_exits_1_on_drift_and_0_when_in_sync(app_db, capsys):
    assert cli.main(["check", "--database-url", app_db.url, "--models", "dbcore.models:MODELS"]) == 0
    assert "schema matches the models" in capsys.readouterr().out
    _run(app_db, "ALTER TABLE document DROP COLUMN metadata")
    assert cli.main(["check", "--json", "--database-url", app_db.url,
                     "--models", "dbcore.models:MODELS"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False
    assert data["drift"]["differences"][0]["kind"] == "missing_column"
    assert query(app_db.url, "SELECT count(*) FROM project") == [(0,)]  # read only


def test_post_checks_judge_what_the_batch_changed_and_note_what_was_there_before(app_db):
    # a real app's database: a table and an index no model describes, there before any apply
    _run(app_db, "CREATE TABLE legacy_sessions (id serial PRIMARY KEY, data text)")
    _run(app_db, "CREATE INDEX project_name_lower ON project (lower(name))")
    _run(app_db, "CREATE INDEX project_created ON project (created_at)")
    before = drift_before(app_db, MODELS)
    assert not before.ok
    unchanged = run_post_checks(app_db, MODELS, before=before)
    assert unchanged.ok  # nothing the batch did: notes, not failures
    assert any("already before the apply: table legacy_sessions" in n for n in unchanged.drift.notes)
    assert "already before the apply" in unchanged.to_markdown()

    _run(app_db, "ALTER TABLE document DROP COLUMN metadata")  # what "the batch" changed
    changed = run_post_checks(app_db, MODELS, before=before)
    assert not changed.ok
    kinds = {d.kind for d in changed.drift.differences}
    assert "missing_column" in kinds and "extra_table" not in kinds  # only what changed fails


def test_without_models_the_schema_is_not_compared_and_the_check_passes(app_db):
    _run(app_db, "CREATE TABLE legacy_sessions (id serial PRIMARY KEY)")
    report = run_post_checks(app_db, load_models(""))
    assert report.ok
    assert "schema not compared" in report.text() and "MIGRATE_MODELS is not set" in report.text()
    assert cli.main(["check", "--database-url", app_db.url]) == 2  # asked for explicitly: an error
