"""Approve or reject a paused `migrate` run from a terminal (Prefect has no `flow-run resume`).

    python flows/approve.py RUN_ID --approve --approver NAME [--comment TEXT]
    python flows/approve.py RUN_ID --reject --approver NAME [--comment TEXT]

Talks to the server in PREFECT_API_URL (the one the run is paused on), else to the local one
`make run` started. Exit codes: 0 the answer
was accepted; 1 it was not (the run is not paused or not found, the answer is invalid, the
server is unreachable); 2 a usage error.
"""

import argparse
import sys
from pathlib import Path
from typing import Optional
from uuid import UUID

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
if __name__ == "__main__":  # without PREFECT_API_URL: the local Prefect API of `make run`, if it is up
    from flows.local_api import use_local_api

    use_local_api()

import httpx  # only for the errors of Prefect's client, raised once its retries are spent
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.client.schemas.responses import SetStateStatus
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from pydantic import ValidationError

from flows.approval import Approval


def plan_headline(client: SyncPrefectClient, run_id: UUID) -> Optional[str]:
    """Return the one-line summary of the run's `migration-plan` artifact, or None if it has none."""
    found = client.read_artifacts(artifact_filter=ArtifactFilter(
        flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]),
        key=ArtifactFilterKey(any_=["migration-plan"])))
    return found[0].description if found else None


def answer(run_id: UUID, approval: Approval) -> tuple[bool, str]:
    """Resume the paused run with ``approval``; return (accepted, one line saying what happened)."""
    verb = "approved" if approval.approve else "rejected"
    with get_client(sync_client=True) as client:
        try:
            client.read_flow_run(run_id)  # the server answers a resume of an unknown run with a 500
        except ObjectNotFound:
            return False, f"no flow run {run_id} on {client.api_url}"
        headline = plan_headline(client, run_id)
        if headline:
            print(f"plan: {headline}")
        result = client.resume_flow_run(run_id, run_input=approval.model_dump(
            include={"approve", "approver", "comment"}))
    if result.status is not SetStateStatus.ACCEPT:  # REJECT/ABORT come back with HTTP 200
        reason = result.details.reason if result.details else result.status.value
        return False, f"not {verb}: the server refused the answer for run {run_id}: {reason}"
    return True, f"{verb} run {run_id} as {approval.approver}: the run resumes"


def main(argv: Optional[list] = None) -> int:
    """Parse the arguments, send the answer, print one line; return the exit code."""
    parser = argparse.ArgumentParser(prog="python flows/approve.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", type=UUID, help="the paused flow run's id (shown in the UI)")
    choice = parser.add_mutually_exclusive_group(required=True)
    choice.add_argument("--approve", action="store_true", help="apply the plan")
    choice.add_argument("--reject", action="store_true", help="change nothing")
    parser.add_argument("--approver", required=True, help="your name, recorded in migration_audit")
    parser.add_argument("--comment", default="", help="why (optional)")
    args = parser.parse_args(argv)
    try:
        approval = Approval(approve=args.approve, approver=args.approver, comment=args.comment)
    except ValidationError as exc:
        parser.error(exc.errors()[0]["msg"])
    if not get_current_settings().api.url:  # an ephemeral API would never know the run
        parser.error("set PREFECT_API_URL to the API of the server the run is paused on")
    try:
        accepted, line = answer(args.run_id, approval)
    except httpx.HTTPStatusError as exc:
        accepted, line = False, (f"run {args.run_id} refused by the server: HTTP "
                                 f"{exc.response.status_code} {exc.response.reason_phrase}")
    except httpx.HTTPError as exc:
        accepted, line = False, f"cannot reach the Prefect API: {exc}"
    print(line)
    return 0 if accepted else 1


if __name__ == "__main__":
    sys.exit(main())
