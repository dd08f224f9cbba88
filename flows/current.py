"""The flow run the calling code runs in, typed: Prefect's get_run_context() may also be a task's."""

from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext


def current_flow_run() -> FlowRun:
    """Return the flow run this code runs in (a task's too); raise RuntimeError outside any."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("called outside a flow run")
    return context.flow_run
