"""The migration safety lint: one bad migration per rule, the sample migrations, the CLI."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, SAMPLE_MIGRATIONS
from dbcore import cli
from dbcore.lint import RULES, LintReport, lint_file, lint_paths, lint_source, lint_sql

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
    assert covered == set(RULES)
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
    ("pw.ForeignKeyField(Project, null=True)", {"DS102"}),
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


def test_set_not_null_after_a_validated_check_is_the_recipe():
    assert lint_sql([
        "ALTER TABLE project ADD CONSTRAINT slug_nn CHECK (slug IS NOT NULL) NOT VALID",
        "ALTER TABLE project VALIDATE CONSTRAINT slug_nn",
        "ALTER TABLE project ALTER COLUMN slug SET NOT NULL",
        "ALTER TABLE project DROP CONSTRAINT slug_nn",
    ]) == []


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
