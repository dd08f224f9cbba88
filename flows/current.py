"""The flow run the calling code runs in, typed: Prefect's get_run_context() may also be a task's."""

import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext


def current_flow_run() -> FlowRun:
    """Return the flow run this code runs in (a task's too); raise RuntimeError outside any."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("called outside a flow run")
    return context.flow_run


def keep_on_this_run(key: str, value: str) -> None:
    """Store ``value`` under ``key`` as a run input of the current flow run, once.

    A retried attempt (same plan, same key) finds it there already: the server answers a second
    write of a key with 409 Conflict, which is kept as it is.
    """
    with get_client(sync_client=True) as client:
        try:
            client.create_flow_run_input(current_flow_run().id, key, value)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != 409:
                raise
