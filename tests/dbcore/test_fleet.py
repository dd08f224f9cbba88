"""The fleet's targets file, its waves and fingerprints, and the database a url_env names."""

from __future__ import annotations

import pytest
from helpers import apply_pending

from dbcore.connection import Env, Target, resolve_target
from dbcore.deploy.fleet import (
    FleetApproval,
    FleetFileError,
    FleetTarget,
    PlanNotApproved,
    database_fingerprint,
    load_fleet,
    plan_database,
)
from dbcore.deploy.fleet_report import DatabaseOutcome, final_line, not_started
from dbcore.errors import ConfigError
from dbcore.migrate.plan import plan_apply
from dbcore.settings import Settings


def _doc(n: int, extra: str = "") -> str:
    return extra + "databases:\n" + "".join(f"  - {{name: db{i}, url_env: DB{i}_URL}}\n" for i in range(1, n + 1))


def test_defaults_and_waves_canary_first_then_groups_of_concurrency():
    fleet = load_fleet(_doc(6))
    assert (fleet.canary, fleet.concurrency) == (1, 4)
    assert [[t.name for t in w] for w in fleet.waves()] == [["db1"], ["db2", "db3", "db4", "db5"], ["db6"]]
    fleet = load_fleet(_doc(6, "canary: 2\nconcurrency: 3\n"))
    assert [[t.name for t in w] for w in fleet.waves()] == [["db1", "db2"], ["db3", "db4", "db5"], ["db6"]]
    no_canary = load_fleet(_doc(3, "canary: 0\nconcurrency: 2\n"))
    assert [len(w) for w in no_canary.waves()] == [2, 1]


@pytest.mark.parametrize(("text", "says"), [
    ("databases:\n  - {name: a, url_env: 'postgres://u:secret@h/db'}\n", "url_env must be the NAME"),
    ("databases:\n  - {name: a, url_env: A, url: 'postgres://u:secret@h/db'}\n", "unknown key(s) url"),
    (_doc(2) + "  - {name: db1, url_env: OTHER}\n", "name db1 appears twice"),
    (_doc(2) + "  - {name: db3, url_env: DB1_URL}\n", "url_env DB1_URL appears twice"),
    (_doc(2, "canary: 3\n"), "canary is 3 but there are only 2 databases"),
    (_doc(2, "concurrency: 0\n"), "concurrency must be a whole number of at least 1"),
    (_doc(2, "waves: 3\n"), "unknown key(s) waves"),
    ("databases: []\n", "databases must be a non-empty list"),
    ("databases: [\n", "is not valid YAML at line"),
    ("- a\n", "must be a mapping"),
])
def test_a_bad_targets_file_is_refused_naming_the_problem_never_a_password(text, says):
    with pytest.raises(FleetFileError) as caught:
        load_fleet(text, "fleet.yaml")
    assert says in str(caught.value) and "secret" not in str(caught.value)
    assert str(caught.value).startswith("fleet.yaml")


def test_url_env_names_the_variable_that_holds_the_url(monkeypatch):
    monkeypatch.setenv("TENANT_A_URL", "postgres://app:s3cret@127.0.0.1:5432/tenant_a")
    target = resolve_target(Settings(), "local", database_url_env="TENANT_A_URL")
    assert target.dbname == "tenant_a" and target.env is Env.LOCAL
    with pytest.raises(ConfigError, match="^TENANT_B_URL is not set: set it to the database's URL"):
        resolve_target(Settings(), "local", database_url_env="TENANT_B_URL")
    with pytest.raises(ConfigError, match="is not an environment variable name") as caught:
        resolve_target(Settings(), "local", database_url_env="postgres://app:s3cret@h/db")
    assert "s3cret" not in str(caught.value)
    monkeypatch.setenv("TENANT_C_URL", "host=h password=s3cret")
    with pytest.raises(ConfigError, match="address in TENANT_C_URL is not a postgres:// URL") as caught:
        resolve_target(Settings(), "local", database_url_env="TENANT_C_URL")
    assert "s3cret" not in str(caught.value)


def test_the_approval_covers_only_the_plan_it_was_given(target, settings, migrations_dir):
    settings = settings.model_copy(update={"migrations_dir": migrations_dir})
    member = FleetTarget("tenant-a", "TENANT_A_URL")
    planned = plan_database(member, target, settings)
    assert [name for name, _ in planned.migrations][-1] == "004_fix_sourcedir_language"
    assert planned.size_bytes > 0 and planned.ok
    approval = FleetApproval(fleet_fingerprint="f" * 64, database="tenant-a",
                             plan_fingerprint=planned.fingerprint, approver="Ada")
    assert approval.check(plan_apply(target, settings)) == "Ada"
    (migrations_dir / "004_fix_sourcedir_language.py").write_text(
        (migrations_dir / "004_fix_sourcedir_language.py").read_text() + "\n# edited after the approval\n")
    with pytest.raises(PlanNotApproved, match="the plan of tenant-a .* is not the one the fleet approval"):
        approval.check(plan_apply(target, settings))
    other = FleetApproval(fleet_fingerprint="f" * 64, database="tenant-b",
                          plan_fingerprint=planned.fingerprint)
    with pytest.raises(PlanNotApproved):  # another database's part does not fit this one
        other.check(plan_apply(target, settings))


def test_an_unreachable_database_is_planned_as_an_error_without_its_password(settings):
    unreachable = Target(Env.LOCAL, "postgres://app:s3cret@127.0.0.1:1/nowhere")
    planned = plan_database(FleetTarget("gone", "GONE_URL"), unreachable, settings)
    assert not planned.ok and "cannot connect" in planned.error and "s3cret" not in planned.error


def test_an_up_to_date_database_has_an_empty_part(target, settings, migrations_dir):
    settings = settings.model_copy(update={"migrations_dir": migrations_dir})
    apply_pending(target, settings)
    planned = plan_database(FleetTarget("done", "DONE_URL"), target, settings)
    assert planned.migrations == () and planned.fingerprint == database_fingerprint("done", [])


def test_the_final_line_counts_every_outcome():
    outcomes = [DatabaseOutcome("a", "applied", ("001",)), DatabaseOutcome("b", "up to date"),
                DatabaseOutcome("c", "failed", message="failed at apply, nothing changed: boom"),
                *not_started(["d", "e"])]
    assert final_line(outcomes) == ("1 applied, 1 up to date, 1 failed, 2 not started; "
                                    "c: failed at apply, nothing changed: boom")
