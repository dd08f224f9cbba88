"""The fleet's approval, borne out by Prefect's own record: what the fleet run stores, what a database's run reads.

The `migrate-fleet` run stores its plan's parts (each database's name, URL variable and plan
fingerprint, whose digest is the fleet fingerprint) on itself as a run input before it asks for
the approval. A database's `migrate` run handed a ``fleet_approval`` reads, through Prefect's API,
the named fleet run, its own parent, the stored parts and the stored approvals, and
dbcore.deploy.fleet.verify_fleet_approval judges them: a parameter alone approves nothing.
"""

import json
from typing import Optional
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from pydantic import ValidationError

from dbcore.deploy import fleet as fleets
from flows.approval import Approval
from flows.current import current_flow_run, keep_on_this_run

PARTS_KEY = "fleet-parts-{fingerprint}"


def record_parts(fingerprint: str, parts: list) -> None:
    """Store the fleet plan's parts on the current (fleet) run, for its databases' runs to check."""
    keep_on_this_run(PARTS_KEY.format(fingerprint=fingerprint), json.dumps(parts))


def _approvers(client, run_id: UUID, fingerprint: str) -> tuple[str, ...]:
    """The names of the valid approvals of ``fingerprint`` stored on the run (strict: lax input is none)."""
    found = []
    # Prefect keeps a pause's answer under "paused-" + the pause key + "-response"
    for stored in client.filter_flow_run_input(run_id, f"paused-plan-{fingerprint}-", 200, set()):
        if not stored.key.endswith("-response"):
            continue
        try:
            value = json.loads(stored.value)
            answer = Approval.model_validate({"fingerprint": fingerprint, **value})
        except (ValueError, TypeError, ValidationError):
            continue
        if answer.approve and answer.approver.strip() and answer.fingerprint == fingerprint:
            found.append(answer.approver)
    return tuple(found)


def fleet_run_record(approval: fleets.FleetApproval) -> fleets.FleetRunRecord:
    """Return what Prefect's API holds about the fleet run ``approval`` names and about this run."""
    me = current_flow_run()
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment(me.deployment_id).name if me.deployment_id else None
        try:
            run_id = UUID(approval.fleet_run_id)
            fleet_run = client.read_flow_run(run_id)
        except (ValueError, ObjectNotFound):
            return fleets.FleetRunRecord(deployment)
        flow_name = client.read_flow(fleet_run.flow_id).name
        state = fleet_run.state.type.value if fleet_run.state else ""
        child = False
        if me.parent_task_run_id:
            child = client.read_task_run(me.parent_task_run_id).flow_run_id == run_id
        try:
            parts = json.loads(client.read_flow_run_input(
                run_id, PARTS_KEY.format(fingerprint=approval.fleet_fingerprint)))
        except (ObjectNotFound, ValueError):
            parts = None
        if not isinstance(parts, list):
            parts = None
        approvers = _approvers(client, run_id, approval.fleet_fingerprint)
    return fleets.FleetRunRecord(deployment, True, flow_name, state, child, parts, approvers)


def verified(approval: Optional[fleets.FleetApproval], url_env: Optional[str], live: bool
             ) -> Optional[fleets.FleetApproval]:
    """Return ``approval`` borne out by Prefect's record (its approver the stored one), None for none.

    Raises FleetApprovalRefused: a made-up approval, one handed to `migrate-production`, one whose
    fleet run nobody approved (``live``: a person must have).
    """
    if approval is None:
        return None
    return fleets.verify_fleet_approval(approval, url_env, fleet_run_record(approval),
                                        needs_person=live)
