"""The ``dbmigrate`` command: authoring and operating migrations.

Each sub-command is a small function over dbcore; only ``main()`` turns errors into exit codes:
0 success; 1 the operation failed (the database is as before); 2 usage or configuration error.
Sub-commands of each area register themselves from the modules beside this one.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

import peewee
import psycopg2
from pydantic import ValidationError

from dbcore.cli.context import EXIT_FAILED, EXIT_USAGE, Context, common_options
from dbcore.errors import ConfigError, DbcoreError
from dbcore.redact import error_line, install_log_scrubber, redact
from dbcore.settings import Settings, describe_invalid

log = logging.getLogger(__name__)

#: the module of each sub-command, so that one command imports only its own area: `dbmigrate
#: backup` need not load the lint's SQL parser or peewee-migrate (bench/RESULTS.md, backup as a
#: command). A command missing here still works: every area is then loaded.
AREAS = {"status": "migrations", "new": "migrations", "plan": "migrations", "apply": "migrations",
         "rollback": "migrations", "lint": "lint", "check": "lint", "backup": "backup",
         "backups": "backup", "verify": "backup", "restore": "backup", "prune": "backup",
         "suggest-indexes": "advise"}
ALL_AREAS = ("migrations", "lint", "backup", "advise")


def _areas(argv: list[str] | None) -> tuple[str, ...]:
    """Return the areas whose sub-commands the parser needs for ``argv``."""
    command = next((a for a in (argv or []) if not a.startswith("-")), None)
    return (AREAS[command],) if command in AREAS else ALL_AREAS


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """Return the parser of the sub-commands ``argv`` needs (every one when in doubt)."""
    common = common_options()
    parser = argparse.ArgumentParser(
        prog="dbmigrate", parents=[common],
        description="Apply Peewee migrations to PostgreSQL safely: plan, lint, back up, apply, roll back.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for area in _areas(argv):
        importlib.import_module(f"dbcore.cli.{area}").register(sub, common)
    return parser


def _configure_logging(verbose: bool) -> None:
    install_log_scrubber()  # a --verbose traceback holds what the error holds
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
    parser = build_parser(argv if argv is not None else sys.argv[1:])
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
        secrets: list[str | None] = list(settings.secrets()) if settings else []
        if args.database_url:
            from dbcore.redact import url_password

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
    except Exception as exc:  # a bug, or an error nobody foresaw: one scrubbed line, not a raw traceback
        if args.verbose:
            log.exception("%s", type(exc).__name__)
        print(f"dbmigrate: error: unexpected {type(exc).__name__}: {error_line(exc)} (run again "
              "with --verbose for the traceback, and report it)", file=sys.stderr)
        return EXIT_FAILED

