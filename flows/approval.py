"""The approval form shown in the Prefect UI when a run pauses, and the one helper that asks it.

Both approvals of a run use :func:`ask_approval`: the apply's (the plan) and, should the
rollback functions fail, the restore's (the backup to put back). An approval covers one
fingerprint, once: the form carries the fingerprint of what it approves (an answer naming
another is refused while the run keeps waiting), and the pause key is unique to the attempt,
so a retried run never finds the answer given to an earlier attempt (Prefect issue #12279).
"""

import json
import uuid
from dataclasses import dataclass
from typing import Optional

import httpx
from prefect import get_run_logger, pause_flow_run
from prefect.client.orchestration import get_client
from prefect.exceptions import FlowPauseTimeout
from prefect.input import RunInput
from prefect.states import Failed
from pydantic import ConfigDict, Field, ValidationError, create_model, model_validator
from pydantic.config import JsonDict

from flows import notifications
from flows.current import current_flow_run, keep_on_this_run

# The server checks an answer against the form's JSON schema only: "a name when approving" is
# said there too, so that a nameless approval is refused while the run keeps waiting.
_NAME_WHEN_APPROVING: JsonDict = {
    "if": {"properties": {"approve": {"const": True}}, "required": ["approve"]},
    "then": {"properties": {"approver": {"pattern": "\\S"}}, "required": ["approver"]},
}


class Approval(RunInput):
    """Approve or reject applying the plan shown in the run's artifacts.

    Strict: an answer written straight into the run's input (not through the resume endpoint,
    whose schema check would refuse it) with ``"approve": "true"`` is malformed, not an approval.
    """

    model_config = ConfigDict(json_schema_extra=_NAME_WHEN_APPROVING, strict=True)

    approve: bool = Field(default=False, description="Apply the migrations of the plan artifact")
    approver: str = Field(default="", description="Your name, recorded in migration_audit")
    comment: str = Field(default="", description="Why (optional)")
    fingerprint: str = Field(default="", description="The plan's fingerprint, as shown above: leave it")

    @model_validator(mode="after")
    def _approver_named(self) -> "Approval":
        # An approval must say who approved; an empty resume stays a rejection (approve=False).
        if self.approve and not self.approver.strip():
            raise ValueError("an approval needs the approver's name")
        return self


def approval_form(description: str, fingerprint: str) -> type[Approval]:
    """Return the form for ``fingerprint``: fail-safe defaults (an empty resume rejects), ``description`` above.

    The fingerprint field accepts only ``fingerprint`` (a JSON-schema pattern the server checks,
    and pydantic at load): an answer for another plan is refused while the run keeps waiting.
    """
    form = create_model("Approval", __base__=Approval, fingerprint=(str, Field(
        default=fingerprint, pattern=f"^{fingerprint}$",
        description="The plan's fingerprint, as shown above: leave it")))
    return form.with_initial_data(description=description, approve=False)


def pause_key(fingerprint: str) -> str:
    """Return a pause key unique to this attempt of the run and to what is approved."""
    attempt = current_flow_run().run_count
    return f"plan-{fingerprint}-attempt-{attempt}-{uuid.uuid4().hex[:8]}"


def fingerprint_of(key: Optional[str]) -> Optional[str]:
    """Return the fingerprint inside a pause key made by :func:`pause_key`, or None."""
    parts = (key or "").split("-")
    return parts[1] if len(parts) >= 2 and parts[0] == "plan" else None


#: the run input beside a pause: what waits for the approval (read by flows/approve.py --list)
WAITING_KEY = "waiting-{fingerprint}"


@dataclass(frozen=True)
class Waiting:
    """What a paused run asks to have approved, as data: where (``target``) and in one line."""

    target: str  # "postgres://app:***@host:5432/app (production)", "a fleet of 12 databases (production)"
    headline: str

    @classmethod
    def read(cls, client, run_id, fingerprint: str) -> Optional["Waiting"]:
        """Return what the run stored for ``fingerprint`` through :func:`ask_approval`, or None."""
        try:
            value = json.loads(client.read_flow_run_input(run_id, WAITING_KEY.format(fingerprint=fingerprint)))
            return cls(str(value["target"]), str(value["headline"]))
        except httpx.HTTPStatusError as exc:  # 404: nothing stored (a run paused by anything else)
            if exc.response.status_code != 404:
                raise
        except (ValueError, KeyError, TypeError):  # not ours
            pass
        return None


def record_waiting(fingerprint: str, waiting: Waiting) -> None:
    """Store what the run is about to wait for beside its pause (a retried attempt's stays)."""
    keep_on_this_run(WAITING_KEY.format(fingerprint=fingerprint),
                     json.dumps({"target": waiting.target, "headline": waiting.headline}))


def malformed(exc: ValidationError) -> str:
    """Return why a stored answer is not a valid approval, in one line (no value is echoed)."""
    errors = exc.errors()
    if any("approver's name" in str(e.get("msg", "")) for e in errors):
        return "an approval must give the approver's name"
    where = ", ".join(".".join(map(str, e["loc"])) or "answer" for e in errors[:3])
    return (f"a malformed answer was stored ({where}: {errors[0]['msg']}); approve through the "
            "form or `python flows/approve.py`")


@dataclass(frozen=True)
class Decision:
    """The approver's answer: approved (by whom, why), or else the refusal in words."""

    approved: bool
    approver: str = ""
    comment: str = ""
    refusal: str = ""  # "rejected by Bob: not on a Friday", "rejected (no answer within 60s)"


def ask_approval(description: str, *, headline: str, target: str, fingerprint: str, timeout: int,
                 consequence: str) -> Decision:
    """Pause the current run until the form is answered, or ``timeout`` seconds; return the decision.

    The approver is notified (``headline``, the run's URL, the terminal command); ``target`` (the
    masked URL and environment) and ``headline`` are stored beside the pause as a run input, for
    ``approve.py --list``. No answer in time, or an approval without a name, is a refusal;
    ``consequence`` (what a refusal means, e.g. "nothing changed") ends the message Prefect shows
    for a timed-out run.
    """
    record_waiting(fingerprint, Waiting(target, headline))
    notifications.waiting_for_approval(headline, fingerprint)
    try:
        answer = pause_flow_run(wait_for_input=approval_form(description, fingerprint),
                                timeout=timeout, poll_interval=2, key=pause_key(fingerprint))
    except FlowPauseTimeout:
        refusal = f"rejected (no answer within {timeout}s)"
        # Prefect has already failed the run with its own words; put ours in their place.
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(current_flow_run().id,
                                      Failed(message=f"{refusal}, {consequence}"), force=True)
        return Decision(False, refusal=refusal)
    except ValidationError as exc:
        # The form's schema cannot say "a name when approving"; the model does, at load. Any
        # other invalid answer was written around the form: it is a rejection, never coerced.
        return Decision(False, refusal=f"rejected ({malformed(exc)})")
    why = f": {answer.comment}" if answer.comment else ""
    if not answer.approve:
        who = f" by {answer.approver}" if answer.approver else ""
        return Decision(False, answer.approver, answer.comment, refusal=f"rejected{who}{why}")
    get_run_logger().info("approved by %s%s", answer.approver, why)
    return Decision(True, answer.approver, answer.comment)
