"""The team's data checks in the `migrate` flow: a failing verify() or SQL check stops the run at
the rehearsal (nothing changed, before any approval), and after a live apply it runs the rollback."""

from __future__ import annotations

import pytest
from data_check_helpers import add_failing_check, seed_projects
from flowruns import applied, artifacts
from helpers import apply_pending, query

from dbcore.connection import Env, Target
from flows.migrate import migrate

NAMES = {"verify": "005_clear_draft_slugs.py verify()", "sql": "checks/project_slug_filled.sql"}


def _staged(flow_env, db_url, migrations_dir, kind):
    apply_pending(Target(Env.LOCAL, db_url), flow_env)
    seed_projects(db_url)
    add_failing_check(migrations_dir, kind)
    return [str(r[0]) for r in query(db_url, "SELECT id FROM project WHERE name LIKE 'draft%' ORDER BY id")]


@pytest.mark.parametrize("kind", ["verify", "sql"])
def test_a_failing_check_stops_the_run_at_the_rehearsal(kind, flow_env, db_url, migrations_dir):
    keys = _staged(flow_env, db_url, migrations_dir, kind)
    state = migrate(require_approval=True, return_state=True)  # it never gets as far as the pause
    assert state.is_failed()
    assert state.message.startswith("failed at rehearsal, nothing changed")
    assert (f"check {NAMES[kind]} (every project has a slug) failed: 2 offending row(s); "
            f"primary keys {', '.join(keys)}") in state.message
    assert "secret" not in state.message
    plan = artifacts(state.state_details.flow_run_id)["migration-plan"]
    assert "Data checks **failed**" in plan and "secret" not in plan
    assert applied(db_url)[-1] == "004_fix_sourcedir_language"
    assert query(db_url, "SELECT count(*) FROM project WHERE slug IS NULL") == [(0,)]


@pytest.mark.parametrize("kind", ["verify", "sql"])
def test_a_failing_check_after_the_live_apply_rolls_it_back(kind, flow_env, db_url, migrations_dir):
    _staged(flow_env, db_url, migrations_dir, kind)
    state = migrate(backup=False, return_state=True)  # no rehearsal: the live post-checks catch it
    assert state.is_failed()
    assert state.message.startswith("failed after apply at post-checks")
    assert f"check {NAMES[kind]} (every project has a slug) failed: 2 offending row(s)" in state.message
    assert "rolled back by rollback functions (005_clear_draft_slugs)" in state.message
    assert "secret" not in state.message
    assert applied(db_url)[-1] == "004_fix_sourcedir_language"
    assert query(db_url, "SELECT count(*) FROM project WHERE slug IS NULL") == [(0,)]
