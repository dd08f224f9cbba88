"""The approval form shown in the Prefect UI when a run pauses before applying."""

from prefect.input import RunInput
from pydantic import ConfigDict, Field, model_validator

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


def approval_form(plan_markdown: str) -> type[Approval]:
    """Return the form with fail-safe defaults (an empty resume rejects) and the plan as its description."""
    return Approval.with_initial_data(description=plan_markdown, approve=False)
