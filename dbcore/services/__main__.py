"""``python -m dbcore.services up|down|status``: the embedded local services of `make run`."""

from __future__ import annotations

import sys

from dbcore.errors import DbcoreError
from dbcore.redact import mask_url
from dbcore.services.local import down, read_local_services, up
from dbcore.settings import Settings


def main(argv: list[str]) -> int:
    """Run one verb; return the exit code."""
    verb = argv[0] if argv else "status"
    settings = Settings()
    try:
        if verb == "up":
            services = up(settings)
            if services.database_url:
                print(f"PostgreSQL: {services.database_url}")
            if services.s3_endpoint_url:
                print(f"S3: {services.s3_endpoint_url} bucket {services.s3_bucket}")
            if services.prefect_ui_url:
                print(f"Prefect UI: {services.prefect_ui_url}")
        elif verb == "down":
            stopped = down(settings)
            print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        elif verb == "status":
            recorded = read_local_services(settings)
            if recorded is None:
                print("nothing recorded: run `make run`")
            else:
                print(f"PostgreSQL: {mask_url(recorded.database_url) or 'configured elsewhere'}")
                print(f"S3: {recorded.s3_endpoint_url or 'configured elsewhere'}")
                print(f"Prefect UI: {recorded.prefect_ui_url or 'configured elsewhere (PREFECT_API_URL)'}")
        else:
            print(f"usage: python -m dbcore.services up|down|status (not {verb!r})", file=sys.stderr)
            return 2
    except DbcoreError as exc:
        print(f"dbcore.services: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
