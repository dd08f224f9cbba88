"""Every error dbcore raises; each message names the problem and the fix."""

from __future__ import annotations


class DbcoreError(Exception):
    """Base of every error raised by dbcore."""

    #: safe to run the same operation again as it is (nothing was changed)
    retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ConfigError(DbcoreError):
    """The configuration or the command line is wrong (missing variable, contradicting --env, bad path)."""


class EnvMismatch(ConfigError):
    """An explicit --env contradicts what the environment variables say."""


class DatabaseUnavailable(DbcoreError):
    """The database cannot be reached or refused the connection."""

    retryable = True


class MigrationFileError(DbcoreError):
    """A migration file cannot be read or compiled (syntax error, missing file, bad name)."""


class MigrationExited(DbcoreError):
    """Migration code called sys.exit(): a failure, never a quiet end."""


class MigrationFailed(DbcoreError):
    """A migration raised while running; its batch was rolled back."""

    def __init__(self, message: str, *, committed: tuple[str, ...] | list[str] = (),
                 retryable: bool | None = None) -> None:
        super().__init__(message, retryable=retryable)
        #: migrations committed before the failing one (only when an ``atomic = False`` one split
        #: the plan into several transactions); empty means the database is exactly as before
        self.committed: tuple[str, ...] = tuple(committed)


class SqlDiffers(MigrationFailed):
    """The apply would send other schema SQL than the rehearsal did; stopped before it committed."""


class TransactionBroken(MigrationFailed):
    """A migration ended the batch transaction itself (COMMIT, ROLLBACK): part of the batch is committed."""


class NonAtomicFailed(MigrationFailed):
    """An ``atomic = False`` migration failed or left an INVALID index; it ran in autocommit."""


class UnsafeChange(MigrationFileError):
    """A migration asks for a change with no safe form in place (a table rewrite); the batch was rolled back."""


class PhaseFailed(MigrationFailed):
    """A step after the batch's commit (index build, backfill, validation) failed; a rerun continues it."""

    def __init__(self, message: str, *, phase: int = 0, committed: tuple[str, ...] | list[str] = ()) -> None:
        super().__init__(message, committed=committed)
        #: the phase the run reached (2 index builds, 3 backfills, 4 validation)
        self.phase = phase


class MigrationLockTimeout(DbcoreError):
    """Another run holds the migration advisory lock and did not release it in time."""

    retryable = True


class TableLockTimeout(MigrationFailed):
    """A statement waited longer than lock_timeout for a table lock; the batch was rolled back."""

    retryable = True


class PlanOutdated(DbcoreError):
    """The database's migration history changed between planning and applying."""


class LintStopped(DbcoreError):
    """The pending migrations have lint errors: nothing was run."""


class RollbackRefused(DbcoreError):
    """A migration to roll back has a missing or empty rollback() while its migrate() changed the schema."""


class NothingToRollback(DbcoreError):
    """Rollback was asked for more migrations than are applied."""


class PreflightFailed(DbcoreError):
    """Sessions on the live database would block the run and did not end in time; nothing was changed."""


class RehearsalFailed(DbcoreError):
    """The plan failed on the scratch copy: the live database was not touched."""


class RehearsalMajorMismatch(RehearsalFailed):
    """The rehearsal server runs another PostgreSQL major than the target, and the same was required."""


class RollbackFailed(DbcoreError):
    """Neither the rollback functions nor the backup brought the database back."""


class BackupFailed(DbcoreError):
    """A backup could not be taken or stored; no partial object was left."""


class BackupCorrupt(DbcoreError):
    """A stored backup does not match its recorded checksum or cannot be read by pg_restore."""


class BackupNotFound(DbcoreError):
    """No backup object exists under the given key."""


class StorageError(DbcoreError):
    """The S3-compatible storage could not be reached or refused a request (endpoint, credentials, bucket)."""


class RestoreRefused(DbcoreError):
    """A restore was refused to protect existing data (non-empty or production target)."""


class RestoreFailed(DbcoreError):
    """pg_restore failed while restoring a backup."""


class ToolNotFound(ConfigError):
    """A PostgreSQL client program (pg_dump, pg_restore) is missing or of the wrong major version."""


class TunnelError(DbcoreError):
    """The proxy tunnel could not be opened or died (command missing, exited, port never opened)."""

    retryable = True


class LivePolicyRefused(ConfigError):
    """A production or proxy change was asked for without the backup or the approval it needs."""


class PlanChangedSinceApproval(DbcoreError):
    """The plan made again right before the apply is not the one approved; nothing was changed."""


class UnknownModel(MigrationFileError, KeyError, ValueError):
    """``migrator.orm[...]`` (or a table name passed to the migrator) names no model the history defines."""

    def __str__(self) -> str:
        return str(self.args[0])


class SchemaSnapshotFailed(DbcoreError):
    """pg_dump --schema-only could not read the database."""


class FleetFileError(ConfigError):
    """The targets file is not a valid fleet document."""


class FleetApprovalRefused(DbcoreError):
    """A run was handed a fleet approval that Prefect's record of the fleet run does not bear out."""


class PlanNotApproved(DbcoreError):
    """A database's plan differs from the one the fleet's approval covered."""


class DeployBusy(DbcoreError):
    """Another deploy of the same database held the slot for longer than this run waits."""


class ChildEnded(DbcoreError):
    """The child process ended without an answer: os._exit, a signal, a crash, or the deadline."""

    def __init__(self, message: str, *, reason: str = "", events: tuple = ()) -> None:
        super().__init__(message)
        #: what ended it, in a few words ("exited with code 0 (os._exit or a crash)")
        self.reason = reason or message
        #: the events the child sent before it ended, oldest first
        self.events = tuple(events)


class ChildDeadline(ChildEnded):
    """The child ran past its deadline and was stopped from outside."""
