"""No secret leaves a task, an artifact or a log record: the flows' side of dbcore.redact's one scrubber.

Importing this module installs the log scrubber for the process (a `serve` process, a worker's
run, a terminal run): every record, Prefect's own "Task run failed with exception ..." included,
is scrubbed before any handler (the API's ``log`` table, the console) sees it. The flows take
``task`` and the artifact functions from here instead of from Prefect:

- ``task``: Prefect's decorator over a function whose exception is scrubbed before it leaves
  (its message and the errors chained to it), so the task run's state, its retries' log lines
  and the flow's final state never hold a secret the exception carried;
- ``create_markdown_artifact`` / ``create_table_artifact``: scrubbed before they are stored.
"""

import functools
from typing import Any, Callable

from prefect import task as prefect_task
from prefect.artifacts import create_markdown_artifact as _prefect_markdown
from prefect.artifacts import create_table_artifact as _prefect_table

from dbcore.redact import install_log_scrubber, scrub, scrub_exception

install_log_scrubber()


def scrubbed(fn: Callable) -> Callable:
    """Return ``fn`` whose exceptions leave with their messages scrubbed (type and attributes kept)."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            clean = scrub_exception(exc)
            if clean is exc:
                raise
            raise clean from None

    return wrapper


def task(fn: Callable | None = None, **options: Any):
    """Prefect's ``@task`` (same options) over a function whose exceptions are scrubbed."""
    if fn is None:
        return lambda f: prefect_task(scrubbed(f), **options)
    return prefect_task(scrubbed(fn), **options)


def create_markdown_artifact(markdown: str, **options: Any):
    """Prefect's create_markdown_artifact, the text scrubbed first."""
    return _prefect_markdown(scrub(markdown), **options)


def create_table_artifact(table: Any, **options: Any):
    """Prefect's create_table_artifact, every cell of text scrubbed first."""
    if isinstance(table, list):
        table = [{k: scrub(v) if isinstance(v, str) else v for k, v in row.items()}
                 if isinstance(row, dict) else row for row in table]
    if isinstance(options.get("description"), str):
        options["description"] = scrub(options["description"])
    return _prefect_table(table, **options)
