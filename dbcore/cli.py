"""The ``dbmigrate`` command: authoring and operating migrations.

Each sub-command is a small function over dbcore; only ``main()`` turns errors into exit codes:
0 success; 1 the operation failed (the database is as before); 2 usage or configuration error.
Sub-commands of other areas register themselves from ``dbcore/cli_*.py`` modules.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Callable

import peewee
import psycopg2
from pydantic import ValidationError

from dbcore.connection import Env, Target, error_line, redact, resolve_target
from dbcore.errors import ConfigError, DbcoreError
from dbcore.settings import Settings, describe_invalid

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class Context:
    """What every sub-command receives: parsed arguments and settings, and the target on demand."""

    def __init__(self, args: argparse.Namespace, settings: Settings):
        self.args = args
        self.settings = settings
        self._target: Target | None = None
        self._tunnel = None

    @property
    def target(self) -> Target:
        """The database to act on (resolved lazily: `new` and `lint` need none).

        In the proxy environment the tunnel is opened here and closed by :meth:`close`.
        """
        if self._target is None:
            target = resolve_target(self.settings, self.args.env, self.args.database_url)
            if target.env is Env.PROXY:
                from dbcore.proxy import open_tunnel

                self._tunnel = open_tunnel(self.settings)
                target = self._tunnel.target_for(target)
            self._target = target
        return self._target

    def close(self) -> None:
        """Close the tunnel, if one was opened."""
        if self._tunnel is not None:
            self._tunnel.close()
            self._tunnel = None


Handler = Callable[[Context], int]


def common_options() -> argparse.ArgumentParser:
    """Options every sub-command accepts, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", default=argparse.SUPPRESS,
                        help="target database (default: $DATABASE_URL, else the embedded local one)")
    common.add_argument("--migrations-dir", default=argparse.SUPPRESS,
                        help="folder of NNN_name.py migrations (default: ./migrations)")
    common.add_argument("--env", choices=[e.value for e in Env], default=argparse.SUPPRESS,
                        help="assert the environment; it must agree with FLY_APP_NAME / "
                             "USE_FLY_POSTGRES_FROM_LOCAL_PROXY")
    common.add_argument("--verbose", "-v", action="store_true", default=argparse.SUPPRESS,
                        help="show debug logs and tracebacks")
    return common


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of every sub-command."""
    from dbcore import cli_backup, cli_lint, cli_migrations

    common = common_options()
    parser = argparse.ArgumentParser(
        prog="dbmigrate", parents=[common],
        description="Apply Peewee migrations to PostgreSQL safely: plan, lint, back up, apply, roll back.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (cli_migrations, cli_lint, cli_backup):
        module.register(sub, common)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _interrupt_on_sigterm() -> None:
    """Make SIGTERM (timeout, systemd, a container stop) unwind like Ctrl-C, so cleanups run."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    """Run ``dbmigrate``; return the exit code."""
    _interrupt_on_sigterm()
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in (("database_url", None), ("migrations_dir", None), ("env", None),
                          ("verbose", False)):
        if not hasattr(args, name):
            setattr(args, name, default)
    _configure_logging(args.verbose)
    settings: Settings | None = None
    try:
        overrides = {"migrations_dir": args.migrations_dir} if args.migrations_dir else {}
        settings = Settings(**overrides)
        ctx = Context(args, settings)
        try:
            return args.handler(ctx)
        finally:
            ctx.close()
    except ValidationError as exc:
        print(f"dbmigrate: error: {describe_invalid(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except (DbcoreError, peewee.DatabaseError, psycopg2.Error, OSError) as exc:
        secrets = [settings.database_password() if settings else None]
        if args.database_url:
            from dbcore.connection import url_password

            secrets.append(url_password(args.database_url))
        if args.verbose:
            log.exception("%s", type(exc).__name__)
        text = error_line(exc)
        if isinstance(exc, OSError):
            text = f"{type(exc).__name__}: {text}"
        elif not isinstance(exc, DbcoreError):
            text = f"the database refused: {text}"
        print(f"dbmigrate: error: {redact(text, *secrets)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED
    except KeyboardInterrupt:
        print("dbmigrate: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
