"""Approve or reject a paused `migrate` run from a terminal (Prefect has no `flow-run resume`).

    python flows/approve.py --list
    python flows/approve.py RUN_ID --approve --approver NAME [--comment TEXT] [--fingerprint FP]
    python flows/approve.py RUN_ID --reject --approver NAME [--comment TEXT]

Talks to the server in PREFECT_API_URL (the one the run is paused on), else to the local one
`make run` started. ``--fingerprint`` is the
plan fingerprint you read (in the plan, the form, ``--list`` and the notification): if the run
now waits for another plan, the approval is refused. Exit codes: 0 the answer was accepted (or
the list was printed); 1 it was not (the run is not paused or not found, its plan changed, the
answer is invalid, the server is unreachable); 2 a usage error.
"""

import argparse
import sys
from datetime import datetime, timezone
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
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.responses import SetStateStatus
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings
from pydantic import ValidationError

from flows.approval import Approval, Waiting, fingerprint_of


def waiting_for(client: SyncPrefectClient, run: FlowRun) -> Optional[Waiting]:
    """Return what the paused ``run`` waits to have approved (stored beside its pause), or None."""
    fingerprint = waiting_fingerprint(run)
    return Waiting.read(client, run.id, fingerprint) if fingerprint else None


def waiting_fingerprint(run: FlowRun) -> Optional[str]:
    """Return the fingerprint of the plan a paused run waits to have approved, or None."""
    if run.state is None or run.state.type is not StateType.PAUSED:
        return None
    return fingerprint_of(run.state.state_details.pause_key)


def _since(moment: datetime) -> str:
    minutes = int((datetime.now(timezone.utc) - moment).total_seconds() // 60)
    return f"{moment.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC ({minutes} min ago)"


def list_paused() -> list[str]:
    """Return one line per `migrate` (or `migrate-fleet`) run waiting for an approval, oldest first."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["migrate", "rollback-migrations",
                                                            "migrate-fleet"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                type=FlowRunFilterStateType(any_=[StateType.PAUSED]))),
            sort=FlowRunSort.START_TIME_ASC)
        lines = []
        for run in runs:
            waiting = waiting_for(client, run) or Waiting("? (see the run's plan artifact)", "")
            since = _since(run.state.timestamp) if run.state else "?"
            lines.append(f"{run.id}  {run.name}  target {waiting.target}  paused since "
                         f"{since}  plan {waiting_fingerprint(run) or '?'}"
                         + (f"\n    {waiting.headline}" if waiting.headline else ""))
    return lines


def answer(run_id: UUID, approval: Approval, reviewed: Optional[str] = None) -> tuple[bool, str]:
    """Resume the paused run with ``approval``; return (accepted, one line saying what happened).

    ``reviewed`` is the fingerprint the approver read: a run now waiting for another is refused.
    """
    verb = "approved" if approval.approve else "rejected"
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)  # the server answers a resume of an unknown run with a 500
        except ObjectNotFound:
            return False, f"no flow run {run_id} on {client.api_url}"
        waiting = waiting_fingerprint(run)
        if approval.approve and reviewed and waiting and reviewed != waiting:
            return False, (f"not approved: run {run_id} now waits for plan {waiting}, not the plan "
                           f"{reviewed} you read: the plan changed; read it again (--list)")
        asked = waiting_for(client, run)
        if asked:
            print(f"plan: {asked.headline}")
        run_input = approval.model_dump(include={"approve", "approver", "comment"})
        if waiting:
            run_input["fingerprint"] = reviewed or waiting
        result = client.resume_flow_run(run_id, run_input=run_input)
    if result.status is not SetStateStatus.ACCEPT:  # REJECT/ABORT come back with HTTP 200
        reason = getattr(result.details, "reason", None) or result.status.value
        return False, f"not {verb}: the server refused the answer for run {run_id}: {reason}"
    return True, f"{verb} run {run_id} as {approval.approver}: the run resumes"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python flows/approve.py", description=__doc__.splitlines()[0])
    parser.add_argument("run_id", type=UUID, nargs="?", help="the paused flow run's id (shown in the UI)")
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--list", action="store_true", help="list the runs waiting for an approval")
    choice.add_argument("--approve", action="store_true", help="apply the plan")
    choice.add_argument("--reject", action="store_true", help="change nothing")
    parser.add_argument("--approver", help="your name, recorded in migration_audit")
    parser.add_argument("--comment", default="", help="why (optional)")
    parser.add_argument("--fingerprint", help="the plan fingerprint you read: refused if the plan changed")
    return parser


def _run(args: argparse.Namespace) -> tuple[bool, str]:
    if args.list:
        lines = list_paused()
        where = get_current_settings().api.url
        return True, "\n".join(lines) if lines else f"no run is waiting for an approval on {where}"
    approval = Approval(approve=args.approve, approver=args.approver, comment=args.comment)
    return answer(args.run_id, approval, args.fingerprint)


def main(argv: Optional[list] = None) -> int:
    """Parse the arguments, list or send the answer, print what happened; return the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.list:
        if args.run_id is None or not (args.approve or args.reject) or args.approver is None:
            parser.error("give RUN_ID, --approve or --reject, and --approver NAME (or --list)")
        try:
            Approval(approve=args.approve, approver=args.approver, comment=args.comment)
        except ValidationError as exc:
            parser.error(exc.errors()[0]["msg"])
    if not get_current_settings().api.url:  # an ephemeral API would never know the run
        parser.error("set PREFECT_API_URL to the API of the server the run is paused on")
    try:
        ok, text = _run(args)
    except httpx.HTTPStatusError as exc:
        ok, text = False, (f"refused by the server: HTTP {exc.response.status_code} "
                           f"{exc.response.reason_phrase}")
    except httpx.HTTPError as exc:
        ok, text = False, f"cannot reach the Prefect API: {exc}"
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
