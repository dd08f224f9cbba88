"""The `suggest-indexes` flow: index proposals for a database, published as an artifact.

Reads the target's queries (pg_stat_statements, read-only), proves candidate indexes with HypoPG
on a copy on the rehearsal server (never the live database), and publishes the proposal table
as the `index-proposals` markdown artifact. It writes no migration: a person reads the proposal,
checks it with the team, and runs `dbmigrate suggest-indexes --write` to get one.

Run it: ``python flows/suggest_indexes.py --env local``; deployed (on a schedule) as
``suggest-indexes/suggest-indexes-weekly`` (deployments/prefect.yaml). No ``from __future__
import annotations`` here: Prefect reads the parameter annotations at run time.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Literal, Optional, cast

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dbcore")
if __name__ == "__main__":  # a terminal run: the local Prefect API of `make run`, if it is up
    from flows.local_api import use_local_api

    use_local_api()

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State
from pydantic import ValidationError

from dbcore.advise.prove import Advice
from dbcore.advise.report import markdown
from dbcore.advise.suggest import suggest_indexes as propose
from dbcore.checks.post import load_models
from dbcore.connection import Env, Target, resolve_target
from dbcore.deploy.scratch import RehearsalServer, rehearsal_server
from dbcore.errors import DbcoreError
from dbcore.redact import error_line
from dbcore.services.local import ensure_local_cluster
from dbcore.settings import Settings, describe_invalid
from flows import tasks

EnvName = Literal["local", "proxy", "production"]


@task(name="propose-indexes", cache_policy=NO_CACHE)
def proposals(target: Target, settings: Settings, server: RehearsalServer, queries_file: Optional[str],
              app: Optional[str], margin: float) -> Advice:
    """Read the workload, prove the candidates on a copy, drop the copy; return the proposals."""
    models = load_models(settings.models) if app else None
    return propose(target, settings, server=server, queries_file=Path(queries_file) if queries_file else None,
                   app=Path(app) if app else None, models=models, margin=margin)


@flow(name="suggest-indexes", log_prints=False, validate_parameters=True)
def suggest_indexes(
    env: Optional[EnvName] = None,
    queries_file: Optional[str] = None,
    app: Optional[str] = None,
    min_saving: Optional[float] = None,
    database_url_env: Optional[str] = None,
):
    """Publish the index proposals as the `index-proposals` artifact; change no database."""
    tasks.show_dbcore_logs()
    secret = None
    try:
        settings = Settings()
        target = resolve_target(settings, env, database_url_env=database_url_env)
        secret = target.password
        margin = (min_saving if min_saving is not None else settings.index_min_saving) / 100
        with contextlib.ExitStack() as held:
            if target.env is Env.PROXY:
                target = held.enter_context(tasks.open_tunnel(settings)).target_for(target)
            server = rehearsal_server(target, settings, start_local=ensure_local_cluster)
            advice = proposals(target, settings, server, queries_file, app, margin)
    except ValidationError as exc:
        return Failed(message=f"failed, nothing changed: {describe_invalid(exc)}")
    except DbcoreError as exc:
        return Failed(message=f"failed, nothing changed: {exc}")
    except Exception as exc:
        get_run_logger().exception("unexpected error")
        return Failed(message=f"failed ({type(exc).__name__}: {error_line(exc, secret)}), nothing changed")
    n = len(advice.proposals)
    headline = (f"{n} index(es) proposed for {target.dbname}" if n
                else f"no index to propose for {target.dbname}")
    create_markdown_artifact(markdown(advice, margin, target.dbname), key="index-proposals",
                             description=headline)
    return Completed(message=headline)


def main(argv: Optional[list] = None) -> int:
    """Run the flow from a terminal: print one line; exit 0 on success."""
    parser = argparse.ArgumentParser(prog="python flows/suggest_indexes.py",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=["local", "proxy", "production"])
    parser.add_argument("--queries", dest="queries_file", help="a file of SQL statements")
    parser.add_argument("--app", help="the app's code (with MIGRATE_MODELS)")
    parser.add_argument("--min-saving", type=float, default=None, help="percent (default 50)")
    args = parser.parse_args(argv)
    ran = suggest_indexes(env=args.env, queries_file=args.queries_file, app=args.app,
                          min_saving=args.min_saving, return_state=True)
    state = cast(State, ran)  # a sync flow: the state itself
    print(f"suggest-indexes: {state.message or state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
