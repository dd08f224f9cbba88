"""``dbmigrate lint`` and ``dbmigrate check``: the safety lint and the schema drift check."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import peewee

from dbcore.errors import ConfigError

if TYPE_CHECKING:
    from dbcore.cli.context import Context

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the ``lint`` and ``check`` sub-commands."""
    lint = sub.add_parser(
        "lint", parents=[common], help="check migration files against the safety rules",
        description="Check migration files against the guide's rules and PostgreSQL's locking "
                    "rules (docs/lint-rules.md). Exit 1 when any error is found.")
    lint.add_argument("paths", nargs="*", type=Path, metavar="PATHS",
                      help="migration files or folders (default: the migrations folder)")
    lint.add_argument("--json", action="store_true",
                      help="print the findings as a JSON list (file, line, rule, severity, message)")
    lint.add_argument("--allow-destructive", action="store_true",
                      help="allow migrate() to drop tables (reported as warnings instead)")
    lint.set_defaults(handler=cmd_lint)

    check = sub.add_parser(
        "check", parents=[common], help="compare the models with the live database schema",
        description="Compare the models (tables, columns, types, nullability, indexes, unique "
                    "constraints) with the target database and look for invalid indexes. "
                    "Exit 1 on any difference.")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--models", default=None, metavar="MODULE:ATTR",
                       help="the list of models to compare (default: $MIGRATE_MODELS, "
                            "required)")
    check.set_defaults(handler=cmd_check)


def cmd_lint(ctx: Context) -> int:
    """Print the lint report; return 1 when it has errors."""
    from dbcore.lint.engine import lint_paths

    paths = ctx.args.paths or [ctx.settings.migrations_dir]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise ConfigError(f"no such migration file or folder: {', '.join(missing)}: "
                          "check the path or --migrations-dir")
    report = lint_paths(paths, allow_destructive=ctx.args.allow_destructive,
                        applied=_applied_names(ctx))
    if ctx.args.json:
        print(json.dumps([f.to_dict() for f in report.findings], indent=2))
    else:
        print(report.text())
    return 0 if report.ok else 1


def _applied_names(ctx: Context) -> list[str]:
    """The names the target database records as applied; none when it cannot be read (offline lint)."""
    from dbcore.connection import Env, connect, resolve_target
    from dbcore.errors import DbcoreError
    from dbcore.migrate.history import read_applied

    try:
        target = resolve_target(ctx.settings, ctx.args.env, ctx.args.database_url)
        if target.env is Env.PROXY:  # a lint never opens the tunnel
            return []
        db = connect(target, application_name="dbmigrate lint")
        try:
            return [a.name for a in read_applied(db)]
        finally:
            db.close()
    except (DbcoreError, peewee.PeeweeException) as exc:
        log.info("no database to tell applied files from pending ones (%s): every file is "
                 "judged as pending", exc)
        return []


def cmd_check(ctx: Context) -> int:
    """Print the post-check report (schema drift, invalid indexes); return 1 when it is not ok."""
    from dbcore.checks.post import load_models, run_post_checks

    models = load_models(ctx.args.models or ctx.settings.models)
    if models is None:
        raise ConfigError("no models to compare with: pass --models module:LIST or set "
                          "MIGRATE_MODELS (the sample app's are dbcore.models:MODELS)")
    report = run_post_checks(ctx.target, models)
    print(json.dumps(report.to_dict(), indent=2) if ctx.args.json else report.text())
    return 0 if report.ok else 1
