"""One deploy run, resolved once and passed first: the target, the settings, the run id, the options, the head start.

The `migrate` flow, its tasks and ``dbmigrate`` build a :class:`DeployRun` once (the way alembic
builds its ``Config``) and hand it to every step of dbcore/deploy/steps.py, instead of long
argument lists and module globals. It is frozen: a step that needs another target (the tunnel's)
gets a copy (:meth:`DeployRun.through`).

A terminal run (``python flows/migrate.py``) resolves it before Prefect starts, to begin the head
start; the flow it then starts takes that very run over (:func:`handed_over`), in-process: no URL
crosses the Prefect API.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from dbcore.connection import Env, Target, resolve_target
from dbcore.deploy import policy
from dbcore.deploy.head_start import HeadStart
from dbcore.settings import Settings


@dataclass(frozen=True)
class RunOptions:
    """What the person starting the run chose (flow parameters, command-line flags)."""

    env: str | None = None
    dry_run: bool = False
    backup: bool = True
    allow_destructive: bool = False
    require_approval: bool | None = None
    approval_timeout: int = 3600
    migrations_dir: str | None = None
    database_url_env: str | None = None
    #: go on when a table's writes stay blocked longer than the lock budget (recorded)
    allow_long_locks: bool = False

    def settings(self) -> Settings:
        """Return the settings from the environment, with the chosen migrations folder."""
        return Settings(migrations_dir=Path(self.migrations_dir)) if self.migrations_dir else Settings()


@dataclass(frozen=True)
class DeployRun:
    """Everything a step of a deploy needs besides its own inputs; resolved once per run."""

    target: Target
    settings: Settings
    run_id: str
    options: RunOptions = field(default_factory=RunOptions)
    #: whether a person must approve before the change (the live-target policy, dbcore/deploy/policy.py)
    approval_needed: bool = False
    #: the backup and copy begun before the flow started (dbcore/deploy/head_start.py), if any
    head_start: HeadStart | None = None
    #: starts the laptop's embedded cluster and returns its URL (the proxy environment rehearses there)
    start_local: Callable[[Settings], str] | None = field(default=None, compare=False)

    @classmethod
    def resolve(cls, options: RunOptions, run_id: str = "", *,
                start_local: Callable[[Settings], str] | None = None) -> DeployRun:
        """Read the settings and the target from the environment, apply the policy; raise ConfigError."""
        settings = options.settings()
        target = resolve_target(settings, options.env, database_url_env=options.database_url_env)
        needed = policy.approval_needed(target.env, backup=options.backup,
                                        require_approval=options.require_approval)
        return cls(target, settings, run_id, options, needed, start_local=start_local)

    @property
    def live(self) -> bool:
        return policy.is_live(self.target.env)

    @property
    def secret(self) -> str | None:
        """The target's password: what no message may show."""
        return self.target.password

    def through(self, target: Target) -> DeployRun:
        """The same run, reaching the database at ``target`` (the tunnel's end)."""
        return replace(self, target=target)

    def with_run_id(self, run_id: str) -> DeployRun:
        return replace(self, run_id=run_id)

    def with_head_start(self, head: HeadStart | None) -> DeployRun:
        return replace(self, head_start=head)

    def local(self) -> bool:
        return self.target.env is Env.LOCAL


_HANDED: ContextVar[DeployRun | None] = ContextVar("dbmigrate_deploy_run", default=None)


@contextmanager
def handing_over(run: DeployRun) -> Iterator[None]:
    """Hand ``run`` to the flow started inside the block (same thread: no Prefect parameter)."""
    token = _HANDED.set(run)
    try:
        yield
    finally:
        _HANDED.reset(token)


def handed_over(options: RunOptions) -> DeployRun | None:
    """Return the run handed over for exactly these options, or None."""
    run = _HANDED.get()
    return run if run is not None and run.options == options else None
