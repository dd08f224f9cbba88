"""A head start: the backup and the rehearsal's copy begun while the orchestrator is still starting.

``python flows/migrate.py`` spends seconds starting Prefect's temporary API before the flow's
first task runs, and the backup and the copy are the long part of a run. :func:`begin` plans in a
thread and, when there is something to apply and the lint lets it through, starts the backup
with the copy restored from its stream (:func:`dbcore.deploy.rehearsal.backup_into_copy`). The
flow's backup task :meth:`HeadStart.claim`\\ s it only for the same plan (same target, history and
files); anything else, or a head start nobody claimed, is discarded: its copy dropped and its
backup deleted (a run that stopped before its own backup, at the preflight say, leaves no backup
object behind: no change followed it).

Only a read of the database happens ahead: the plan, the lint, the preflight, ``pg_dump``.
Nothing is applied. It starts the backup only when the preflight finds nothing in the way right
now: otherwise the flow runs its own preflight, which waits (``MIGRATE_PREFLIGHT_WAIT``) and says
what it waited for. The copy is made where the rehearsal runs (dbcore/deploy/scratch.py).
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass, field

from dbcore.backup.dump import S3_ERRORS, BackupInfo, BytesProgress
from dbcore.backup.storage import delete, open_storage
from dbcore.connection import Target
from dbcore.deploy.preflight import PreflightReport, preflight
from dbcore.deploy.rehearsal import ScratchCopy, backup_into_copy
from dbcore.deploy.scratch import RehearsalServer
from dbcore.deploy.touched import tables_of_plan
from dbcore.errors import PreflightFailed
from dbcore.lint.engine import lint_pending
from dbcore.migrate.plan import Plan, plan_apply
from dbcore.redact import error_line
from dbcore.settings import Settings

log = logging.getLogger(__name__)


def plan_key(plan: Plan) -> tuple:
    """What makes two plans the same work: the history they start from and the files, by checksum."""
    return plan.database, plan.applied_before, tuple((m.name, m.sha256) for m in plan.migrations)


@dataclass
class HeadStart:
    """A backup and copy of ``target`` running in a thread since before the flow began."""

    target: Target
    settings: Settings
    server: RehearsalServer
    allow_destructive: bool = False
    key: tuple | None = None
    #: bytes read from pg_dump, and bytes of the stored object restored into the copy, so far
    dumped: int = 0
    restored: int = 0
    #: the preflight before its backup (clear, or it did not start)
    checked: PreflightReport | None = None
    result: tuple[BackupInfo, ScratchCopy] | None = None
    error: BaseException | None = None
    claimed: bool = False
    _planned: threading.Event = field(default_factory=threading.Event)
    _done: threading.Event = field(default_factory=threading.Event)

    def _run(self) -> None:
        try:
            plan = plan_apply(self.target, self.settings)
            lint = lint_pending(self.settings.migrations_dir, [m.path for m in plan.migrations],
                                allow_destructive=self.allow_destructive)
            if plan.empty or not lint.ok:
                return  # the flow finds the same and stops before any backup
            # no wait here: anything in the way is the flow's preflight's to wait for and name
            at_once = self.settings.model_copy(update={"preflight_wait": 0})
            tables = tables_of_plan([m.path for m in plan.migrations])
            try:
                self.checked = preflight(self.target, at_once, tables, "before the backup")
            except PreflightFailed:
                return
            self.key = plan_key(plan)
            self._planned.set()
            self.result = backup_into_copy(self.target, self.server, self.settings,
                                           uuid.uuid4().hex, progress=self._dumped,
                                           restore_progress=self._restored)
        except BaseException as exc:  # handed to whoever claims it; the flow plans again
            self.error = exc
        finally:
            self._planned.set()
            self._done.set()

    def _dumped(self, done: int) -> None:
        self.dumped = done

    def _restored(self, done: int) -> None:
        self.restored = done

    def matches(self, plan: Plan, target: Target) -> bool:
        """True if the head start is doing exactly ``plan``'s work on ``target`` (and not yet taken)."""
        if self.claimed or target.url != self.target.url:
            return False
        self.planned()  # a moment: the plan, the lint and the preflight, before the backup starts
        return self.key == plan_key(plan)

    def claim(self, plan: Plan, target: Target) -> bool:
        """Take the head start for ``plan`` if it is doing exactly that work; True if taken."""
        if not self.matches(plan, target):
            return False
        self.claimed = True
        return True

    def planned(self, timeout: float | None = None) -> bool:
        """Wait until the head start knows its plan (or found nothing to do); True when it does."""
        return self._planned.wait(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the backup and the copy are done (or failed); True when finished."""
        return self._done.wait(timeout)

    def follow(self, progress: BytesProgress | None = None, restore_progress: BytesProgress | None = None
               ) -> tuple[BackupInfo, ScratchCopy]:
        """Wait for the backup and the copy, telling the progress callbacks every second; return them."""
        while not self.wait(timeout=1.0):
            if progress:
                progress(self.dumped)
            if restore_progress:
                restore_progress(self.restored)
        return self.outcome()

    def outcome(self) -> tuple[BackupInfo, ScratchCopy]:
        """Return (backup, copy) once finished; raise what the head start raised."""
        self._done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None  # finished without an error: it has its backup and copy
        return self.result

    def discard(self) -> None:
        """Wait for an unclaimed head start to end; drop its copy and delete its backup."""
        if self.claimed:
            return
        self._done.wait()
        if self.result is not None:
            info, copy = self.result
            log.info("head start not used (the run planned something else or stopped before "
                     "its backup): dropping its copy %s and its backup %s", copy.target.dbname,
                     info.key)
            copy.discard()
            try:
                delete(open_storage(self.settings), info.key)
            except S3_ERRORS as exc:
                log.warning("the unused head start's backup %s could not be deleted: %s", info.key,
                            error_line(exc))


def begin(target: Target, settings: Settings, server: RehearsalServer, *,
          allow_destructive: bool = False) -> HeadStart:
    """Start planning, and the backup with its copy on ``server`` when there is work and nothing
    is in the way, in a daemon thread."""
    head = HeadStart(target, settings, server, allow_destructive)
    threading.Thread(target=head._run, name="dbmigrate-head-start", daemon=True).start()
    return head
