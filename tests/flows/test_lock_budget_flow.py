"""The lock budget as a production run meets it: stopped at the rehearsal, or let through and recorded."""

from __future__ import annotations

from flowruns import applied, artifacts
from helpers import apply_pending, schema_dump

from dbcore.connection import Env, Target
from flows.migrate import migrate


def test_a_production_dry_run_over_the_lock_budget_stops_with_nothing_changed(
        flow_env, db_url, monkeypatch, other_pg_server_url):
    apply_pending(Target(Env.LOCAL, db_url), flow_env, upto="003")
    monkeypatch.setenv("FLY_APP_NAME", "myapp")
    monkeypatch.setenv("MIGRATE_REHEARSAL_DATABASE_URL", other_pg_server_url)
    monkeypatch.setenv("MIGRATE_LOCK_BUDGET", "0")  # any write blocked at all is too long
    before = schema_dump(db_url)

    state = migrate(env="production", dry_run=True, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed at rehearsal, nothing changed: sourcedir: writes "
                                    "blocked ~"), state.message
    assert "over the lock budget of 0 s (DL001)" in state.message
    assert "004_fix_sourcedir_language.py statement" in state.message and "safe form" in state.message
    plan = artifacts(state.state_details.flow_run_id)["migration-plan"]
    assert plan.index("### What the live application will feel") < plan.index("### Migrations")
    assert "STOPS THE RUN" in plan
    assert schema_dump(db_url) == before and applied(db_url)[-1] == "003_add_project_slug"

    allowed = migrate(env="production", dry_run=True, allow_long_locks=True, return_state=True)
    assert allowed.is_completed(), allowed.message
    plan = artifacts(allowed.state_details.flow_run_id)["migration-plan"]
    assert "ALLOWED over the 0 s budget by --allow-long-locks" in plan
    assert schema_dump(db_url) == before
