"""One deploy at a time per database, through the pause: a Prefect global concurrency limit of 1.

The deployment's own concurrency limit (deployments/prefect.yaml, deployments/serve.py) queues
runs before they start, but Prefect releases a deployment slot when its run pauses, so a second
run would start and pause beside the first. The slot taken here is held by the flow's process
(its lease renewed by Prefect's thread) from before the backup until the run ends, the pause
included; the next run waits for it before doing anything (docs/deploy.md). A killed process's
lease lapses within LEASE_SECONDS.
"""

import contextlib

from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from dbcore.connection import Target
from dbcore.errors import DeployBusy
from flows.current import current_flow_run

#: a run whose process was killed holds the slot until its lease lapses: keep that short. A
#: renewal that fails once does not end the run (the migration lock still keeps applies apart).
LEASE_SECONDS = 60  # the shortest the server takes


def slot_name(target: Target) -> str:
    """Return the name of the concurrency limit of ``target``'s database."""
    return f"migrate-deploy-{target.dbname}"


@contextlib.contextmanager
def one_deploy_at_a_time(target: Target, wait_seconds: float):
    """Hold the deploy slot of ``target``'s database while the block runs; raise DeployBusy after ``wait_seconds``."""
    name = slot_name(target)
    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, 1)
        except ObjectAlreadyExists:  # another run created it a moment ago
            pass
        busy = client.read_global_concurrency_limit_by_name(name).active_slots >= 1
    if busy:  # said once, as a warning: the run shows no progress until the other one ends
        get_run_logger().warning("another deploy of %s is running or waiting for approval: this run "
                                 "waits for it (up to %ss)", target.dbname, int(wait_seconds))
    holder = ConcurrencyLeaseHolder(type="flow_run", id=current_flow_run().id)
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(concurrency(name, timeout_seconds=wait_seconds, strict=True,
                                           holder=holder, lease_duration=LEASE_SECONDS,
                                           raise_on_lease_renewal_failure=False))
        except TimeoutError:
            raise DeployBusy(f"another deploy of {target.dbname} held the deploy slot for more "
                             f"than {int(wait_seconds)}s: answer or cancel it, then run again") from None
        yield
