"""The approval as a person gives it: the Prefect UI of a real `prefect server start`, in headless
Chromium. Screenshots of every step go to the test's tmp dir."""

from __future__ import annotations

import time

from helpers import query
from runs import ALL, FAILS_ON_LIVE, history, newest_plan, resume, start_run, wait_for


def open_run(page, prefect_server, run_id: str) -> None:
    """Open the run's page in the UI."""
    page.goto(f"{prefect_server.api_url.removesuffix('/api')}/runs/flow-run/{run_id}")


def submit(page, form) -> None:
    """Click the form's Submit until the server takes the answer. A loaded server answers 503 (its
    database busy: retry), which Prefect's Python client retries and the UI shows as "Oops.
    Something went wrong." with the form still open: a person clicks again. Anything else fails."""
    for attempt in range(1, 4):
        with page.expect_response(lambda r: r.url.endswith("/resume") and r.request.method == "POST",
                                  timeout=30_000) as answered:
            form.get_by_role("button", name="Submit").click()
        response = answered.value
        if response.status != 503:
            assert response.status < 400, f"the server refused the resume: HTTP {response.status} {response.text()}"
            return
        time.sleep(attempt)
    raise AssertionError("the server answered every resume with 503 (busy)")


def test_approved_in_the_browser_the_run_applies(served, prefect_server, production_env, db_url,
                                                 page, tmp_path):
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served)
        open_run(page, prefect_server, run_id)
        page.get_by_role("button", name="Resume").click()
        form = page.get_by_role("dialog")
        form.get_by_role("switch").wait_for()
        page.screenshot(path=str(tmp_path / "1-form.png"), full_page=True)
        lines = [line for line in form.inner_text().splitlines() if line.strip()]
        plan = newest_plan(api, run_id)
        fingerprint = plan["data"].split("plan fingerprint `")[1][:16]
        assert lines[:2] == ["Resume Flow Run", f"Apply 4 migration(s) to {db_url.rsplit('/', 1)[1]} "
                             f"(production): rehearsed on a copy: passed; plan fingerprint {fingerprint}"]
        assert f"database: {db_url}" in lines  # shown whole, masked when it has a password
        assert form.locator("a", has_text="postgres://").count() == 0  # and no link
        form.get_by_role("switch").click()  # Approve
        form.locator("textarea").nth(0).fill("Ada Lovelace")  # Approver
        form.locator("textarea").nth(1).fill("read in the browser")  # Comment
        page.screenshot(path=str(tmp_path / "2-filled.png"), full_page=True)
        submit(page, form)
        state = wait_for(api, run_id, {"COMPLETED"}, served)
        open_run(page, prefect_server, run_id)
        page.get_by_text("Completed").first.wait_for()
        page.screenshot(path=str(tmp_path / "3-completed.png"), full_page=True)
    assert state["message"] == f"applied 4: {', '.join(ALL)}"
    assert history(db_url) == ALL
    assert query(db_url, "SELECT DISTINCT approver, comment FROM migration_audit") == [
        ("Ada Lovelace", "read in the browser")]


def test_retry_in_the_browser_asks_for_the_approval_again(served, prefect_server, production_env,
                                                          db_url, migrations_dir, page, tmp_path):
    (migrations_dir / "005_project_comment.py").write_text(FAILS_ON_LIVE)
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served)
        assert resume(api, run_id, {"approve": True, "approver": "Ada"})["status"] == "ACCEPT"
        wait_for(api, run_id, {"FAILED"}, served)
        open_run(page, prefect_server, run_id)
        page.get_by_role("button", name="Retry").click()
        page.screenshot(path=str(tmp_path / "1-retry.png"), full_page=True)
        confirm = page.get_by_role("dialog")
        if confirm.count():  # the UI may ask to confirm
            confirm.get_by_role("button", name="Retry").click()
        wait_for(api, run_id, {"PAUSED"}, served)
        open_run(page, prefect_server, run_id)
        page.get_by_role("button", name="Resume").wait_for()
        page.get_by_text("Paused", exact=True).first.wait_for()  # the state badge: loaded
        page.screenshot(path=str(tmp_path / "2-paused-again.png"), full_page=True)
        assert history(db_url) == []  # the answer given to the first attempt was not reused
        assert resume(api, run_id, {"approve": False, "approver": "Ada"})["status"] == "ACCEPT"
        wait_for(api, run_id, {"FAILED"}, served)
    assert history(db_url) == []
