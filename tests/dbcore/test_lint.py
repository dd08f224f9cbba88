"""The migration safety lint: one bad migration per rule, the sample migrations, the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, SAMPLE_MIGRATIONS

from dbcore.cli import main as cli
from dbcore.lint.engine import RULES, LintReport, lint_file, lint_paths, lint_source, lint_sql

BAD = REPO / "tests" / "fixtures" / "bad_migrations"
CASES = sorted(p for p in BAD.iterdir() if p.is_dir())


def rules_of(findings) -> set[str]:
    return {f.rule for f in findings}


def lint_text(source: str, **kwargs):
    return lint_source(textwrap.dedent(source), "001_case.py", **kwargs)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_bad_migration_is_flagged_with_its_rule_only(case):
    rule = case.name.split("_")[0]
    report = lint_paths([case])
    assert rules_of(report.findings) == {rule}, report.text()
    for found in report.findings:
        assert found.severity == RULES[rule].severity
        assert found.line >= 1 and Path(found.file).parent == case
        assert ": " in found.message  # every message goes on to say the fix


def test_every_rule_has_a_bad_migration_and_a_documented_recipe():
    covered = {c.name.split("_")[0] for c in CASES}
    # DS108 is measured on the rehearsal copy, not read in a file (tests/dbcore/test_safe_forms.py)
    assert covered | {"DS108"} == set(RULES)
    docs = (REPO / "docs" / "lint-rules.md").read_text()
    for rule in RULES:
        assert f"## {rule}" in docs


def test_sample_migrations_have_no_errors():
    report = lint_paths([SAMPLE_MIGRATIONS])
    assert report.ok, report.text()
    assert len(report.files) == 4
    # the index builds and SET NOT NULL of 003/004 are worth an approver's look, nothing more
    assert rules_of(report.findings) <= {"DS101", "DS104"}


def test_a_file_that_does_not_parse_is_a_finding_with_its_line():
    [found] = lint_file(BAD / "DM000_syntax_error" / "001_broken.py")
    assert (found.rule, found.severity, found.line) == ("DM000", "error", 4)
    assert "expected ':'" in found.message


def test_a_file_that_is_not_utf8_is_a_finding(tmp_path):
    path = tmp_path / "001_latin1.py"
    path.write_bytes(b"# caf\xe9\n")
    assert rules_of(lint_file(path)) == {"DM000"}


def test_lint_never_imports_or_runs_the_file(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "001_side_effect.py"
    path.write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit('imported')\n")
    assert lint_file(path) == []
    assert not marker.exists()


def test_bad_name_suggests_the_right_one():
    [found] = lint_paths([BAD / "DM007_bad_name"]).findings
    assert "005_add_index.py" in found.message


# -- what the guide allows is not flagged ---------------------------------------------------------


def test_rollback_may_drop_what_its_migrate_created():
    findings = lint_text("""
        import peewee as pw

        class Tag(pw.Model):
            class Meta:
                table_name = "tag"

        def migrate(migrator, database, *, fake=False):
            migrator.create_model(Tag)
            migrator.sql("CREATE TABLE tag_alias (id serial PRIMARY KEY)")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("DROP TABLE tag_alias")
            migrator.remove_model(Tag)
    """)
    assert findings == []


DROPPING = """
    {marker}
    def migrate(migrator, database, *, fake=False):
        migrator.remove_model("document")

    def rollback(migrator, database, *, fake=False):
        migrator.sql("CREATE TABLE document (id serial PRIMARY KEY)")
"""


@pytest.mark.parametrize("marker, flag", [("allow_destructive = True", False), ("", True)])
def test_an_explicit_allow_turns_a_drop_into_a_warning(marker, flag):
    [found] = lint_text(DROPPING.format(marker=marker), allow_destructive=flag)
    assert (found.rule, found.severity) == ("DM003", "warning")
    assert "allowed explicitly" in found.message
    [blocked] = lint_text(DROPPING.format(marker=""))
    assert (blocked.rule, blocked.severity) == ("DM003", "error")


@pytest.mark.parametrize("field, rules", [
    ("pw.CharField(max_length=2, null=True)", set()),
    ("pw.CharField(max_length=2, null=True, default='el')", set()),
    # NOT NULL with a default: peewee adds it nullable, fills it, then sets NOT NULL
    ("pw.CharField(max_length=2, default='el')", set()),
    ("pw.CharField(max_length=2)", {"DM004"}),
    ("pw.CharField(max_length=2, null=False, default=None)", {"DM004"}),
    ("pw.IntegerField(null=True, index=True)", {"DS101"}),
    # a foreign key is indexed by default (index=True): a second, non-concurrent build
    ("pw.ForeignKeyField(Project, null=True)", {"DS101", "DS102"}),
    ("pw.ForeignKeyField(Project, null=True, index=False)", {"DS102"}),
])
def test_added_columns(field, rules):
    findings = lint_text(f"""
        import peewee as pw

        class Project(pw.Model):
            class Meta:
                table_name = "project"

        def migrate(migrator, database, *, fake=False):
            migrator.add_columns(Project, x={field})

        def rollback(migrator, database, *, fake=False):
            migrator.drop_columns(Project, "x")
    """)
    assert rules_of(findings) == rules


def test_allow_not_null_is_still_one_step():
    findings = lint_text("""
        def migrate(migrator, database, *, fake=False):
            migrator.add_fields("project", allow_not_null=True, x=pw.CharField(default="a"))

        def rollback(migrator, database, *, fake=False):
            migrator.remove_fields("project", "x")
    """)
    assert rules_of(findings) == {"DM004"}


@pytest.mark.parametrize("call, rules", [
    ('migrator.sql("UPDATE project SET slug = %s WHERE id = %s", slug, 1)', set()),
    ('migrator.sql("UPDATE project SET slug = lower(name) WHERE name LIKE \'a%%\'")', set()),
    ('migrator.sql("UPDATE project " "SET slug = NULL")', set()),
    ('migrator.sql("UPDATE project SET slug = %(s)s", {"s": slug})', set()),
    ('migrator.sql("UPDATE project SET slug = %s", slug, 2)', {"DM009"}),
    ('migrator.sql("UPDATE project SET slug = %s")', {"DM009"}),
    ('migrator.sql("UPDATE project SET slug = \'" + slug + "\'")', {"DM006"}),
    ('database.execute_sql("UPDATE project SET slug = %s", (slug,))', {"DM001"}),
])
def test_sql_calls(call, rules):
    findings = lint_text(f"""
        def migrate(migrator, database, *, fake=False):
            slug = compute()
            {call}

        def rollback(migrator, database, *, fake=False):
            migrator.sql("UPDATE project SET slug = NULL")
    """)
    assert rules_of(findings) == rules


def test_concurrently_is_the_recipe_in_an_atomic_false_migration():
    source = """
        {marker}
        def migrate(migrator, database, *, fake=False):
            migrator.sql("CREATE INDEX CONCURRENTLY IF NOT EXISTS d_f ON document (filename)")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("DROP INDEX CONCURRENTLY IF EXISTS d_f")
    """
    assert lint_text(source.format(marker="atomic = False")) == []
    assert [f.rule for f in lint_text(source.format(marker=""))] == ["DS106", "DS106"]


def test_models_from_the_migrator_or_the_file_are_fine_imported_or_undefined_are_not():
    findings = lint_text("""
        import peewee as pw
        from app import models

        def migrate(migrator, database, *, fake=False):
            class Note(pw.Model):
                pass
            Project = migrator.orm["project"]
            migrator.create_model(Note)
            migrator.add_columns(Project, a=pw.TextField(null=True))
            migrator.add_columns(models.Document, b=pw.TextField(null=True))
            migrator.add_columns(SourceDir, c=pw.TextField(null=True))
            migrator.add_columns(migrator.orm["document"], d=pw.TextField(null=True))

        def rollback(migrator, database, *, fake=False):
            Note = migrator.orm["note"]
            migrator.remove_model(Note)
    """)
    assert [(f.rule, f.line) for f in findings] == [("DM008", 11), ("DM008", 12)]
    assert "imported from app" in findings[0].message
    assert "not defined in this migration" in findings[1].message


def test_migrator_methods_that_rewrite_rename_or_lock_are_flagged_on_existing_tables_only():
    findings = lint_text("""
        import peewee as pw

        class Tag(pw.Model):
            name = pw.CharField()

        def migrate(migrator, database, *, fake=False):
            migrator.rename_column("project", "name", "title")
            migrator.change_columns("project", name=pw.TextField())
            migrator.add_not_null("project", "slug")
            migrator.add_index("project", "slug")
            migrator.create_model(Tag)
            migrator.add_index(Tag, "name")

        def rollback(migrator, database, *, fake=False):
            migrator.remove_model(Tag)
    """)
    assert [f.rule for f in findings] == ["DS105", "DS103", "DS104", "DS101"]


# -- the SQL rules on captured statements ---------------------------------------------------------


def test_an_index_on_a_table_created_in_the_same_batch_needs_no_concurrently():
    assert lint_sql(["CREATE TABLE tag (id int, name text)", "CREATE INDEX tag_name ON tag (name)"]) == []


def test_an_index_on_an_existing_table_is_a_warning_with_the_recipe():
    statements = ["CREATE TABLE tag (id int)", "UPDATE project SET slug = %s",
                  "CREATE INDEX project_name ON project (name)"]
    [found] = lint_sql(statements, existing_tables={"project"}, source="rehearsal")
    assert (found.file, found.line, found.rule, found.severity) == ("rehearsal", 3, "DS101", "warning")
    assert "CONCURRENTLY" in found.message and "atomic = False" in found.message
    # a table that is neither existing nor created here is not worth a warning
    assert lint_sql(statements, existing_tables=set()) == []


def test_multi_statement_strings_report_each_statement_line():
    sql = "ALTER TABLE project ALTER COLUMN slug SET NOT NULL;\n\nALTER TABLE project RENAME TO projects"
    found = lint_sql([sql], lines=[10])
    assert [(f.rule, f.line) for f in found] == [("DS104", 10), ("DS105", 12)]


def test_a_check_added_in_the_same_batch_does_not_make_set_not_null_safe():
    findings = lint_sql([
        "ALTER TABLE project ADD CONSTRAINT slug_nn CHECK (slug IS NOT NULL) NOT VALID",
        "ALTER TABLE project VALIDATE CONSTRAINT slug_nn",
        "ALTER TABLE project ALTER COLUMN slug SET NOT NULL",
        "ALTER TABLE project DROP CONSTRAINT slug_nn",
    ])
    # the ADD's ACCESS EXCLUSIVE lock is held to the end of the transaction: nothing is gained
    assert [(f.rule, f.line) for f in findings] == [("DS102", 2), ("DS104", 3)]
    assert "same transaction" in findings[0].message and "later deploy" in findings[0].message
    assert "does not help" in findings[1].message


@pytest.mark.parametrize("before", [
    "ALTER TABLE project VALIDATE CONSTRAINT project_owner_fk",  # any VALIDATE, even of an FK
    "ALTER TABLE project ADD CONSTRAINT name_nn CHECK (name IS NOT NULL)",  # another column
])
def test_no_other_constraint_hides_set_not_null(before):
    findings = lint_sql([before, "ALTER TABLE project ALTER COLUMN slug SET NOT NULL"])
    assert "DS104" in rules_of(findings)


def test_only_a_check_validated_before_the_batch_on_the_same_column_skips_ds104():
    sql = ["ALTER TABLE project ALTER COLUMN slug SET NOT NULL"]
    assert lint_sql(sql, validated_not_null={("project", "slug")}) == []
    assert rules_of(lint_sql(sql, validated_not_null={("project", "name")})) == {"DS104"}


# -- one pass in source order (review item 1) --------------------------------------------------------


def test_if_not_exists_does_not_make_a_table_new():
    findings = lint_text("""
        def migrate(migrator, database, *, fake=False):
            migrator.sql("CREATE TABLE IF NOT EXISTS project (id serial PRIMARY KEY, slug text)")
            migrator.sql("CREATE INDEX project_slug ON project (slug)")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("DROP INDEX project_slug")
    """)
    assert rules_of(findings) == {"DS101"}
    # the rehearsal knows the existing tables: then IF NOT EXISTS surely created it
    assert lint_sql(["CREATE TABLE IF NOT EXISTS tag (id int)", "CREATE INDEX t ON tag (id)"],
                    existing_tables={"project"}) == []


def test_a_drop_is_judged_where_it_happens_not_after_the_whole_function():
    findings = lint_text("""
        def migrate(migrator, database, *, fake=False):
            migrator.create_model("tag")
            migrator.sql("DROP TABLE tag")
            migrator.sql("DROP TABLE project")
            migrator.create_model("project")

        def rollback(migrator, database, *, fake=False):
            raise RuntimeError("restore the backup")
    """)
    assert [(f.rule, f.line) for f in findings] == [("DM003", 5)]


@pytest.mark.parametrize("create", [
    "CREATE TABLE tag AS SELECT id FROM project",
    "CREATE MATERIALIZED VIEW tag AS SELECT id FROM project",
    "CREATE TABLE tag_new (id int); ALTER TABLE tag_new RENAME TO tag",
])
def test_tables_made_in_the_batch_by_any_means_are_new(create):
    assert lint_sql([create, "CREATE INDEX tag_id ON tag (id)"]) == []


@pytest.mark.parametrize("sql", ["TRUNCATE project", "DROP SCHEMA legacy CASCADE"])
def test_truncate_and_drop_schema_cascade_need_the_allow(sql):
    [found] = lint_sql([sql])
    assert (found.rule, found.severity) == ("DM003", "error")
    [allowed] = lint_sql([sql], allow_destructive=True)
    assert allowed.severity == "warning"


# -- NOT NULL columns (items 3 and 10) ---------------------------------------------------------------


@pytest.mark.parametrize("sql, rules", [
    ("ALTER TABLE project ADD COLUMN lang varchar(2) NOT NULL", {"DM004"}),
    ("ALTER TABLE project ADD COLUMN code int PRIMARY KEY", {"DM004", "DS101"}),
    ("ALTER TABLE project ADD COLUMN lang varchar(2) NOT NULL DEFAULT 'el'", set()),
    ("ALTER TABLE project ADD COLUMN n bigserial NOT NULL", set()),
    ("ALTER TABLE project ADD COLUMN n int GENERATED ALWAYS AS IDENTITY", set()),
    ("CREATE TABLE tag (id int); ALTER TABLE tag ADD COLUMN lang varchar(2) NOT NULL", set()),
])
def test_not_null_columns_added_in_sql(sql, rules):
    assert rules_of(lint_sql([sql])) == rules


ADD_FIELDS = """
    import peewee as pw

    def migrate(migrator, database, *, fake=False):
        {body}

    def rollback(migrator, database, *, fake=False):
        migrator.drop_columns("project", "lang")
"""


@pytest.mark.parametrize("body, rules", [
    ('f = pw.CharField(max_length=2)\n        migrator.add_columns("project", lang=f)', {"DM004"}),
    ('f = pw.CharField(max_length=2, null=True)\n        migrator.add_columns("project", lang=f)',
     set()),
    ('migrator.add_columns("project", **{"lang": pw.CharField(max_length=2)})', {"DM004"}),
])
def test_fields_in_variables_and_literal_dicts_are_followed(body, rules):
    assert rules_of(lint_text(ADD_FIELDS.format(body=body))) == rules


def test_fields_the_lint_cannot_see_are_a_warning_not_silence():
    [found] = lint_text(ADD_FIELDS.format(body='migrator.add_columns("project", **FIELDS)'))
    assert (found.rule, found.severity) == ("DM004", "warning")
    assert "cannot check" in found.message


def test_dm004_says_peewee_fails_at_once():
    [found] = lint_paths([BAD / "DM004_not_null_one_step"]).findings
    assert "ValueError" in found.message


# -- execute_sql, raw cursors and the migrator under other names (item 6) ----------------------------


@pytest.mark.parametrize("line", [
    "database.connection().cursor().execute('SELECT 1')",
    "getattr(database, 'execute_sql')('SELECT 1')",
    "conn = database\n    conn.cursor().execute('SELECT 1')",
])
def test_every_way_to_run_sql_at_once_is_dm001(line):
    findings = lint_text(f"""
def migrate(migrator, database, *, fake=False):
    {line}

def rollback(migrator, database, *, fake=False):
    migrator.sql("SELECT 1")
""")
    assert rules_of(findings) == {"DM001"}


def test_a_helper_never_called_with_the_migrator_is_still_read():
    findings = lint_text("""
        def _cleanup(m):
            m.remove_model("document")

        def migrate(migrator, database, *, fake=False):
            helpers = [_cleanup]
            for helper in helpers:
                helper(migrator)

        def rollback(migrator, database, *, fake=False):
            raise RuntimeError("restore the backup")
    """)
    assert [(f.rule, f.line) for f in findings] == [("DM003", 3)]


@pytest.mark.parametrize("body", [
    "Project.drop_table()",
    "database.drop_tables([Project])",
    "def inner():\n        migrator.remove_model(Project)\n    inner()",
])
def test_drops_by_any_route_are_dm003(body):
    findings = lint_text(f"""
import peewee as pw

class Project(pw.Model):
    class Meta:
        table_name = "project"

def migrate(migrator, database, *, fake=False):
    {body}

def rollback(migrator, database, *, fake=False):
    raise RuntimeError("restore the backup")
""")
    assert rules_of(findings) == {"DM003"}


def test_a_helper_shares_the_callers_batch():
    findings = lint_text("""
        def _create(m):
            m.sql("CREATE TABLE tag (id int)")

        def migrate(migrator, database, *, fake=False):
            _create(m=migrator)
            migrator.sql("CREATE INDEX tag_id ON tag (id)")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("DROP TABLE tag")
    """)
    assert findings == []


# -- how the SQL is built (item 7) --------------------------------------------------------------------


SQL_CASE = """
def migrate(migrator, database, *, fake=False):
    {body}

def rollback(migrator, database, *, fake=False):
    raise RuntimeError("restore the backup")
"""


@pytest.mark.parametrize("body, expected", [
    # the last of two constant assignments is what runs
    ('q = "SELECT 1"\n    q = "DROP TABLE project"\n    migrator.sql(q)', [("DM003", "error")]),
    ('q = "DROP TABLE "\n    q += "project"\n    migrator.sql(q)', [("DM003", "error")]),
    ('migrator.sql(sql="DROP TABLE project")', [("DM003", "error")]),
    ('migrator.sql("".join(["DROP TABLE ", "project"]))', [("DM003", "error")]),
    ('q = "UPDATE project SET a = "\n    q += repr(x)\n    migrator.sql(q)', [("DM006", "error")]),
    # assigned in a branch, a parameter, a call: unknown, said so
    ('if fake:\n        q = "SELECT 1"\n    else:\n        q = "SELECT 2"\n    migrator.sql(q)',
     [("DM006", "warning")]),
    ('migrator.sql(build_sql())', [("DM006", "warning")]),
])
def test_sql_arguments(body, expected):
    findings = lint_text(SQL_CASE.format(body=body))
    assert [(f.rule, f.severity) for f in findings] == expected
    if expected[0] == ("DM006", "warning"):
        assert "cannot check this SQL statically" in findings[0].message


# -- numbering of pending migrations (items 8 and 9) ------------------------------------------------


def _folder(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_text(
            "def migrate(migrator, database, *, fake=False):\n    pass\n")
    return tmp_path


@pytest.mark.parametrize("applied, pending, flagged", [
    (["001_a.py", "003_c.py"], ["004_d.py"], []),  # an old gap is history
    (["001_a.py", "003_c.py"], ["002_b.py"], ["002_b.py"]),  # would run after 003
    (["001_a.py"], ["003_c.py"], ["003_c.py"]),  # a new gap
    (["001_a.py", "002_b.py"], ["002_b_again.py"], ["002_b_again.py"]),  # duplicate
    (["001_a.py"], ["002_b.py", "003_c.py"], []),
])
def test_lint_pending_judges_only_the_pending_numbers(tmp_path, applied, pending, flagged):
    from dbcore.lint.engine import lint_pending
    folder = _folder(tmp_path, *applied, *pending)
    report = lint_pending(folder, [folder / p for p in pending])
    assert sorted(Path(f.file).name for f in report.findings if f.rule == "DM007") == flagged
    assert all(Path(f.file).name in pending for f in report.findings)


def test_file_names_follow_the_runners_own_pattern(tmp_path):
    folder = _folder(tmp_path, "001_add-index.py")
    assert lint_paths([folder]).findings == ()


# -- never a traceback (item 12) and the inline allow -------------------------------------------------


@pytest.mark.parametrize("source", ["x = " + "+".join(["a"] * 200000), "x = 1\x00"])
def test_pathological_sources_are_dm000(source):
    [found] = lint_source(source, "001_x.py")
    assert (found.rule, found.severity) == ("DM000", "error")


def test_a_value_error_from_the_parser_is_dm000(monkeypatch):
    import ast
    monkeypatch.setattr(ast, "parse", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad")))
    assert rules_of(lint_source("x = 1", "001_x.py")) == {"DM000"}


def test_an_inline_marker_allows_one_rule_on_its_line():
    findings = lint_text("""
        def migrate(migrator, database, *, fake=False):
            # dbmigrate: allow DS104 (CHECK validated in deploy 41)
            migrator.sql("ALTER TABLE project ALTER COLUMN slug SET NOT NULL")
            migrator.sql("ALTER TABLE project ALTER COLUMN name SET NOT NULL")
            migrator.sql("DROP TABLE legacy")  # dbmigrate: allow DM003
            migrator.sql("DROP TABLE other")  # dbmigrate: allow DS104

        def rollback(migrator, database, *, fake=False):
            raise RuntimeError("restore the backup")
    """)
    assert [(f.rule, f.line, f.severity) for f in findings] == [
        ("DS104", 5, "warning"), ("DM003", 6, "warning"), ("DM003", 7, "error")]
    assert "allowed explicitly on this line" in findings[1].message


# -- the report and the command --------------------------------------------------------------------


def test_report_renders_as_dict_markdown_and_text():
    report = lint_paths([BAD / "DM001_execute_sql", BAD / "DS101_index_not_concurrent"])
    assert isinstance(report, LintReport)
    assert not report.ok and len(report.errors) == 1 and len(report.warnings) == 1
    data = json.loads(json.dumps(report.to_dict()))
    assert (data["ok"], data["errors"], data["warnings"]) == (False, 1, 1)
    markdown = report.to_markdown()
    assert markdown.startswith("### Lint **failed**: 1 error(s), 1 warning(s) in 2 file(s)")
    assert "| error | DM001 | `" in markdown and "| warning | DS101 | `" in markdown
    assert report.text().splitlines()[-1] == "1 error(s), 1 warning(s) in 2 file(s)"


def test_cli_lint_json_exits_1_on_errors(capsys):
    assert cli.main(["lint", "--json", str(BAD / "DM004_not_null_one_step")]) == 1
    [found] = json.loads(capsys.readouterr().out)
    assert set(found) == {"file", "line", "rule", "severity", "message"}
    assert (found["rule"], found["severity"], found["line"]) == ("DM004", "error", 14)


def test_cli_lint_on_the_sample_migrations_exits_0(capsys):
    assert cli.main(["lint", "--migrations-dir", str(SAMPLE_MIGRATIONS)]) == 0
    out = capsys.readouterr().out
    assert "error" not in out.replace("0 error(s)", "")
    assert out.strip().endswith("0 error(s), 3 warning(s) in 4 file(s)")


def test_cli_lint_allow_destructive_and_missing_paths(capsys):
    case = str(BAD / "DM003_drop_table")
    assert cli.main(["lint", case]) == 1
    assert cli.main(["lint", "--allow-destructive", case]) == 0
    assert "allowed explicitly" in capsys.readouterr().out
    assert cli.main(["lint", str(BAD / "no_such_folder")]) == 2
    assert "no such migration file or folder" in capsys.readouterr().err


# -- peewee-migrate's own idioms, and history judged leniently -----------------------------------

def test_pw_migrate_create_auto_style_is_not_an_error():
    """`pw_migrate create --auto`: decorated classes in migrate(), remove_model by name in rollback()."""
    findings = lint_text('''\
        import peewee as pw

        def migrate(migrator, database, fake=False, **kwargs):
            @migrator.create_model
            class File(pw.Model):
                name = pw.CharField()

            @migrator.create_model
            class InviteCode(pw.Model):
                code = pw.CharField()

                class Meta:
                    table_name = "invite_code"

        def rollback(migrator, database, fake=False, **kwargs):
            migrator.remove_model("file")
            migrator.remove_model("invitecode")
            migrator.remove_model("InviteCode")
        ''')
    assert "DM003" not in rules_of(findings)


def test_rollback_dropping_what_create_tables_made_is_fine_anything_else_is_not():
    source = '''\
        from db.connection import db
        from db.models import Course, Chat

        def migrate(migrator, database, fake=False, **kwargs):
            db.create_tables([Course, Chat])

        def rollback(migrator, database, fake=False, **kwargs):
            db.drop_tables([Chat, Course])
            db.drop_tables([Other])
        '''
    dm003 = [f for f in lint_text(source) if f.rule == "DM003"]
    assert [f.line for f in dm003] == [9]  # only the table the file did not create


def test_findings_in_applied_files_are_notes_and_non_migrations_are_skipped(tmp_path):
    folder = tmp_path / "migrations"
    folder.mkdir()
    drop = "def migrate(migrator, database, **kw):\n    migrator.remove_model('old')\n"
    (folder / "001_a.py").write_text(drop)
    (folder / "001_b.py").write_text(drop)  # a duplicate number, long applied
    (folder / "003_c.py").write_text(drop)  # a gap, then a pending drop
    (folder / "conf.py").write_text('DATABASE = "postgres://localhost/app"\n')  # peewee-migrate's config
    report = lint_paths([folder], applied=["001_a", "001_b"])
    assert {(Path(f.file).name, f.rule) for f in report.errors} == {("003_c.py", "DM003"),
                                                                    ("003_c.py", "DM007")}
    notes = {(Path(f.file).name, f.rule) for f in report.notes}
    assert {("001_a.py", "DM003"), ("001_b.py", "DM007")} <= notes
    assert all(f.message.startswith("(applied) ") for f in report.notes)
    assert "conf.py" not in report.text()
    assert "note(s) on applied files" in report.summary()
