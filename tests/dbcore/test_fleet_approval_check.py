"""The fleet approval a database's run is handed counts only as Prefect's record bears it out
(dbcore.deploy.fleet.verify_fleet_approval): each refusal, and the approver taken from the record."""

from __future__ import annotations

import pytest

from dbcore.deploy.fleet import (
    FleetApproval,
    FleetApprovalRefused,
    FleetRunRecord,
    parts_fingerprint,
    verify_fleet_approval,
)

PARTS = [["tenant-1", "T1_URL", "a" * 64], ["tenant-2", "T2_URL", "b" * 64]]
APPROVAL = FleetApproval(fleet_fingerprint=parts_fingerprint(PARTS), database="tenant-2",
                         plan_fingerprint="b" * 64, approver="Mallory", fleet_run_id="run-1")
GOOD = FleetRunRecord("migrate-fleet-member", True, "migrate-fleet", "RUNNING", True, PARTS, ("Ada",))


def test_a_record_that_bears_it_out_gives_the_stored_approver_not_the_parameter():
    assert verify_fleet_approval(APPROVAL, "T2_URL", GOOD, needs_person=True).approver == "Ada"
    subflow = GOOD.__class__(**{**GOOD.__dict__, "member_deployment": None})
    assert verify_fleet_approval(APPROVAL, "T2_URL", subflow, needs_person=True).approver == "Ada"


@pytest.mark.parametrize(("change", "url_env", "says"), [
    ({"member_deployment": "migrate-production"}, "T2_URL", "the migrate-production deployment never takes one"),
    ({"found": False}, "T2_URL", "it names no migrate-fleet run that exists"),
    ({"flow_name": "migrate"}, "T2_URL", "is a migrate run, not a migrate-fleet run"),
    ({"state": "COMPLETED"}, "T2_URL", "is COMPLETED, so it starts no database"),
    ({"member_is_child": False}, "T2_URL", "this run was not started by the migrate-fleet run"),
    ({"parts": None}, "T2_URL", "holds no plan of fingerprint"),
    ({"parts": PARTS[:1]}, "T2_URL", "holds no plan of fingerprint"),
    ({}, "PRODUCTION_URL", "has no database tenant-2 read from PRODUCTION_URL"),
    ({"approvers": ()}, "T2_URL", "nobody approved the fleet plan"),
])
def test_each_gap_in_the_record_is_a_refusal_naming_it(change, url_env, says):
    record = FleetRunRecord(**{**GOOD.__dict__, **change})
    with pytest.raises(FleetApprovalRefused, match="^fleet_approval refused: ") as refused:
        verify_fleet_approval(APPROVAL, url_env, record, needs_person=True)
    assert says in str(refused.value)


def test_locally_a_fleet_that_asked_nobody_still_needs_its_record():
    unasked = FleetRunRecord(**{**GOOD.__dict__, "approvers": ()})
    assert verify_fleet_approval(APPROVAL, "T2_URL", unasked, needs_person=False).approver == ""
    with pytest.raises(FleetApprovalRefused):
        verify_fleet_approval(APPROVAL, "T2_URL", FleetRunRecord(None), needs_person=False)
