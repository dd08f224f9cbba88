"""The approval form shown in the Prefect UI when a run pauses, and the one helper that asks it.

Both approvals of a run use :func:`ask_approval`: the apply's (the plan) and, should the
rollback functions fail, the restore's (the backup to put back).
"""

from dataclasses import dataclass
from typing import Optional

from prefect import get_run_logger, pause_flow_run
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.states import Failed
from pydantic import ConfigDict, Field, ValidationError, model_validator

# The server checks an answer against the form's JSON schema only: "a name when approving" is
# said there too, so that a nameless approval is refused while the run keeps waiting.
_NAME_WHEN_APPROVING = {
    "if": {"properties": {"approve": {"const": True}}, "required": ["approve"]},
    "then": {"properties": {"approver": {"pattern": "\\S"}}, "required": ["approver"]},
}


class Approval(RunInput):
    """Approve or reject applying the plan shown in the run's artifacts."""

    model_config = ConfigDict(json_schema_extra=_NAME_WHEN_APPROVING)

    approve: bool = Field(default=False, description="Apply the migrations of the plan artifact")
    approver: str = Field(default="", description="Your name, recorded in migration_audit")
    comment: str = Field(default="", description="Why (optional)")

    @model_validator(mode="after")
    def _approver_named(self) -> "Approval":
        # An approval must say who approved; an empty resume stays a rejection (approve=False).
        if self.approve and not self.approver.strip():
            raise ValueError("an approval needs the approver's name")
        return self


def approval_form(description: str) -> type[Approval]:
    """Return the form with fail-safe defaults (an empty resume rejects) and ``description`` above it."""
    return Approval.with_initial_data(description=description, approve=False)


@dataclass(frozen=True)
class Decision:
    """The approver's answer: approved (by whom, why), or else the refusal in words."""

    approved: bool
    approver: str = ""
    comment: str = ""
    refusal: str = ""  # "rejected by Bob: not on a Friday", "rejected (no answer within 60s)"


def ask_approval(description: str, timeout: int, consequence: str,
                 key: Optional[str] = None) -> Decision:
    """Pause the current run until the form is answered, or ``timeout`` seconds; return the decision.

    No answer in time, or an approval without a name, is a refusal; ``consequence`` (what a
    refusal means, e.g. "nothing changed") ends the message Prefect shows for a timed-out run.
    """
    try:
        answer = pause_flow_run(wait_for_input=approval_form(description), timeout=timeout,
                                poll_interval=2, key=key)
    except FlowPauseTimeout:
        refusal = f"rejected (no answer within {timeout}s)"
        # Prefect has already failed the run with its own words; put ours in their place.
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(get_run_context().flow_run.id,
                                      Failed(message=f"{refusal}, {consequence}"), force=True)
        return Decision(False, refusal=refusal)
    except ValidationError:
        # The form's schema cannot say "a name when approving"; the model does, at load.
        return Decision(False, refusal="rejected (an approval must give the approver's name)")
    why = f": {answer.comment}" if answer.comment else ""
    if not answer.approve:
        who = f" by {answer.approver}" if answer.approver else ""
        return Decision(False, answer.approver, answer.comment, refusal=f"rejected{who}{why}")
    get_run_logger().info("approved by %s%s", answer.approver, why)
    return Decision(True, answer.approver, answer.comment)
