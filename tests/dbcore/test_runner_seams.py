"""The runner's seams other modules hook into: phases, each statement a migration sends, each COMMIT."""

from __future__ import annotations

import textwrap

import pytest
from helpers import apply_pending, query, schema_dump

from dbcore.errors import MigrationFailed
from dbcore.migrate.observe import RunObserver


@pytest.fixture
def cfg(settings, migrations_dir):
    return settings.model_copy(update={"migrations_dir": migrations_dir})


class Journal(RunObserver):
    """Writes down what it is told, and queries the run's session the way a lock measurement would."""

    def __init__(self, refuse_commit: bool = False) -> None:
        self.events: list[tuple] = []
        self.refuse_commit = refuse_commit

    def phase_started(self, phase, db):
        self.events.append(("phase", phase.kind, tuple(phase.names)))

    def statement_started(self, statement):
        statement.db.execute_sql("SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()")
        self.events.append(("before", statement.migration, statement.sql))

    def statement_done(self, statement, cursor, error):
        self.events.append(("after", statement.migration, statement.sql, error is None))

    def before_commit(self, phase, results, db):
        self.events.append(("commit", phase.kind, tuple(r.name for r in results)))
        if self.refuse_commit:
            raise RuntimeError("the SQL sent differs from the rehearsal's")


def test_an_observer_sees_each_statement_and_each_commit_and_its_own_queries_stay_out(
        target, cfg):
    journal = Journal()
    report = apply_pending(target, cfg, upto="002", observers=[journal])
    sent = [s for r in report.results for s in r.sql]
    assert not any("pg_locks" in s for s in sent)  # the observer's query is not the migrations' SQL
    before = [e for e in journal.events if e[0] == "before"]
    after = [e for e in journal.events if e[0] == "after"]
    assert [e[2] for e in before] == [e[2] for e in after] == [s.split(" -- params")[0] for s in sent]
    assert all(ok for *_, ok in after)
    assert journal.events[0] == ("phase", "batch", ("001_initial_schema", "002_add_document_metadata"))
    assert journal.events[-1] == ("commit", "batch", ("001_initial_schema", "002_add_document_metadata"))


def test_an_observer_refusing_the_commit_leaves_the_database_as_before(target, cfg, db_url):
    apply_pending(target, cfg, upto="002")
    before = schema_dump(db_url)
    with pytest.raises(MigrationFailed) as info:
        apply_pending(target, cfg, observers=[Journal(refuse_commit=True)])
    assert "differs from the rehearsal" in str(info.value)
    assert "nothing was changed" in str(info.value)
    assert schema_dump(db_url) == before
    assert query(db_url, "SELECT count(*) FROM migratehistory") == [(2,)]


def test_an_atomic_false_migration_is_a_phase_of_its_own_after_the_batch_committed(target, cfg):
    (cfg.migrations_dir / "005_index.py").write_text(textwrap.dedent("""\
        atomic = False

        def migrate(migrator, database, *, fake=False):
            migrator.sql("CREATE INDEX CONCURRENTLY IF NOT EXISTS document_filename "
                         "ON document (filename)")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("DROP INDEX CONCURRENTLY IF EXISTS document_filename")
        """))
    journal = Journal()
    apply_pending(target, cfg, observers=[journal])
    marks = [e[:2] for e in journal.events if e[0] in ("phase", "commit")]
    assert marks == [("phase", "batch"), ("commit", "batch"), ("phase", "alone")]
