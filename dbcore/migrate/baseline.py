"""``dbmigrate baseline NNN``: adopt a database whose schema exists without our records (Flyway's baseline).

Two cases, one command:

- a database created outside migrations (a dump, a hand-made schema): the files up to NNN are
  recorded in ``migratehistory`` as applied, without running them;
- a history pw_migrate wrote (any version) with no ``migration_audit`` rows: the names are there
  but no checksum is, so ``status`` cannot tell an edited file; baseline records the files'
  sha256 as they are now.

Either way every file up to NNN gets a ``migration_audit`` row (action ``baseline``, who, when,
run id), in one transaction under the migration lock. Nothing in the application's schema is
touched.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

from dbcore.connection import Target, connect
from dbcore.errors import ConfigError, PlanOutdated
from dbcore.migrate.files import discover
from dbcore.migrate.history import (
    allow_baseline_rows,
    default_actor,
    ensure_audit_table,
    read_applied,
    record_audit,
)
from dbcore.migrate.locking import configure_session, migration_lock
from dbcore.migrate.plan import pending_files
from dbcore.migrate.router import FileRouter
from dbcore.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaselineReport:
    """What a baseline recorded: files marked applied, and files whose checksum was recorded."""

    database: str
    upto: str
    marked_applied: tuple[str, ...]
    checksums_recorded: tuple[str, ...]
    run_id: str

    def summary(self) -> str:
        marked = (f"marked {len(self.marked_applied)} migration(s) applied without running them"
                  if self.marked_applied else "no migration had to be marked applied")
        return (f"baseline at {self.upto}: {marked}; recorded the checksum of "
                f"{len(self.checksums_recorded)} file(s)")


def baseline(target: Target, settings: Settings, upto: str, *, actor: str | None = None,
             run_id: str | None = None) -> BaselineReport:
    """Record every file up to ``upto`` as applied (and its checksum), running none; raise ConfigError."""
    files = discover(settings.migrations_dir)
    if not files:
        raise ConfigError(f"no migration files in {settings.migrations_dir}: nothing to baseline")
    names = [f.name for f in files]
    chosen = pending_files(files, [], upto)  # every file up to `upto`, by the same rules as --target
    run_id = run_id or uuid.uuid4().hex[:12]
    actor = default_actor(actor or settings.actor)
    with migration_lock(target, settings, f"baseline by {actor}"):
        db = connect(target, application_name=f"dbmigrate baseline by {actor}"[:63])
        try:
            configure_session(db, settings)
            with db.atomic():
                applied = read_applied(db)
                later = [a.name for a in applied if a.name in names
                         and names.index(a.name) >= len(chosen)]
                if later:
                    shown = ", ".join(later[:3]) + (f" and {len(later) - 3} more" if len(later) > 3 else "")
                    raise PlanOutdated(
                        f"{shown} {'is' if len(later) == 1 else 'are'} already applied, after "
                        f"{chosen[-1].name}: baseline at {later[-1][:3]} (the newest applied) or later")
                ensure_audit_table(db)
                allow_baseline_rows(db)
                history = FileRouter(db, settings.migrations_dir).model
                known = {a.name: a for a in applied}
                marked, recorded = [], []
                for file in chosen:
                    if file.name not in known:
                        history.create(name=file.name)
                        marked.append(file.name)
                    if known.get(file.name) is None or known[file.name].checksum is None:
                        record_audit(db, name=file.name, action="baseline", checksum=file.sha256,
                                     actor=actor, run_id=run_id, duration_ms=0)
                        recorded.append(file.name)
        finally:
            db.close()
    report = BaselineReport(target.masked_url, chosen[-1].name, tuple(marked), tuple(recorded), run_id)
    log.info("%s", report.summary())
    return report
