"""Serve the `migrate` flow as a deployment from this process: no work pool, no worker.

    python deployments/serve.py                       # migrate/migrate-production
    python deployments/serve.py --name migrate-staging

Start it in the repository, where DATABASE_URL, MIGRATE_S3_*, AWS_* are set and FLY_APP_NAME is
(Fly sets it): every run gets this process's environment, since flow.serve ignores job variables.
Trigger a run with ``prefect deployment run migrate/migrate-production``; stop with Ctrl-C.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

from flows.migrate import migrate


def main(argv: Optional[list] = None) -> None:
    """Register the deployment and run its flow runs until interrupted."""
    parser = argparse.ArgumentParser(prog="python deployments/serve.py", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="migrate-production", help="deployment name")
    args = parser.parse_args(argv)
    # env asserts where the run is: a serving process without FLY_APP_NAME fails every run at once
    # one deploy at a time, the next one queued (docs/deploy.md), as in deployments/prefect.yaml
    migrate.serve(name=args.name, parameters={"env": "production"},
                  description="Pending migrations to the production database, after approval",
                  tags=["migrations"],
                  global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE))


if __name__ == "__main__":
    main()
