"""``dbmigrate suggest-indexes``: index proposals from how the app queries, proven with HypoPG on a copy."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dbcore.advise.report import markdown, text, write_migration
from dbcore.advise.suggest import suggest_indexes
from dbcore.checks.post import load_models
from dbcore.cli.context import Context
from dbcore.deploy.scratch import rehearsal_server


def _percent(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number: give a percent, e.g. 50") from None
    if not 0 < number < 100:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 100 (exclusive): give e.g. 50")
    return number


def cmd_suggest_indexes(ctx: Context) -> int:
    """Print the proposals (and with --write, write the migration); the target is only read."""
    args, settings = ctx.args, ctx.settings
    target = ctx.target
    server = None
    if not args.copy_url:
        from dbcore.services.local import ensure_local_cluster

        server = rehearsal_server(target, settings, start_local=ensure_local_cluster)
    margin = (args.min_saving if args.min_saving is not None else settings.index_min_saving) / 100
    models = load_models(args.models or settings.models) if args.app else None
    advice = suggest_indexes(target, settings, server=server, copy_url=args.copy_url,
                             backup_key=args.backup, queries_file=args.queries,
                             app=args.app, models=models, margin=margin)
    if args.format == "json":
        print(json.dumps([{"index": p.candidate.definition, "size_bytes": p.size_bytes,
                           "share": p.share, "writes": p.writes,
                           "queries": [{"sql": h.query.sql, "source": h.query.source,
                                        "share": h.share, "cost_before": h.before,
                                        "cost_after": h.after} for h in p.helped]}
                          for p in advice.proposals], indent=2))
    elif args.format == "markdown":
        print(markdown(advice, margin, target.dbname))
    else:
        print(text(advice, margin))
    if args.write and advice.proposals:
        path = write_migration(advice, settings.migrations_dir, margin)
        print(f"wrote {path}: read it with the team, then commit it")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``suggest-indexes`` to ``dbmigrate``."""
    p = sub.add_parser(
        "suggest-indexes", parents=[common],
        help="propose indexes from the queries (pg_stat_statements, a file, the app's code), "
             "proven with HypoPG on a copy; the target is only read")
    p.add_argument("--queries", type=Path, metavar="FILE",
                   help="SQL statements separated by ; (a slow-query log), beside pg_stat_statements")
    p.add_argument("--app", type=Path, metavar="PATH",
                   help="the app's code: Peewee .where()/.order_by()/.join() and foreign keys "
                        "(needs MIGRATE_MODELS or --models)")
    p.add_argument("--models", metavar="MODULE:LIST", help="the app's models (default: $MIGRATE_MODELS)")
    p.add_argument("--min-saving", type=_percent, default=None, metavar="PERCENT",
                   help="propose an index only if it lowers a query's cost by this much "
                        "(default: $MIGRATE_INDEX_MIN_SAVING, 50)")
    p.add_argument("--copy-url", metavar="URL",
                   help="prove on this existing copy (never the target) instead of making one")
    p.add_argument("--backup", metavar="KEY",
                   help="make the copy from this backup (default: a local TEMPLATE copy, else "
                        "the newest backup)")
    p.add_argument("--write", action="store_true",
                   help="write the next NNN_add_index_....py migration with the proposals")
    p.add_argument("--format", choices=("text", "markdown", "json"), default="text")
    p.set_defaults(handler=cmd_suggest_indexes)
