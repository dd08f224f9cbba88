"""Point a terminal run at the local Prefect API that `make run` keeps, before Prefect is imported.

Prefect reads ``PREFECT_API_URL`` when it is imported. Unset, every ``python flows/migrate.py``
would start a temporary API of its own (seconds, each run), and a paused run could be approved only
through that temporary address. ``python -m dbcore.services up`` (what `make run` calls) starts one
``prefect server start`` under ``.local/prefect`` and records it; this uses it when it answers.
No Prefect import here.
"""

import os


def use_local_api() -> None:
    """Set PREFECT_API_URL to the local API `make run` started, unless it is set or none answers."""
    if os.environ.get("PREFECT_API_URL"):
        return
    from pydantic import ValidationError

    from dbcore.embedded import local_prefect_api
    from dbcore.settings import Settings

    try:
        url = local_prefect_api(Settings())
    except ValidationError:
        return  # the flow names the invalid setting itself
    if url:
        os.environ["PREFECT_API_URL"] = url
