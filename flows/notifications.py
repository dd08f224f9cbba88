"""What the approver and the team are told: a run waits for approval, failed, or completed.

Sent to MIGRATE_NOTIFY_URL by ``dbcore.notify`` (never raises, never blocks for long). The end of
a run is told by Prefect's own flow state hooks (``on_completion``, ``on_failure``, ``on_crashed``,
``on_cancellation`` on the `migrate` flow), the pause by the approval helper right before it pauses.
"""

import logging
from typing import Optional

from prefect.settings import get_current_settings
from pydantic import ValidationError

from dbcore.notify import notify
from dbcore.settings import Settings
from flows.current import current_flow_run

log = logging.getLogger(__name__)


def run_url(flow_run_id) -> Optional[str]:
    """Return the run's page in the Prefect UI, when the UI's address is known (PREFECT_UI_URL)."""
    ui = get_current_settings().ui_url
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def _send(text: str) -> None:
    try:
        settings = Settings()
    except ValidationError:  # the run fails for it with its own message; nothing to send with
        log.warning("notification not sent: the settings are invalid")
        return
    notify(settings, text)


def waiting_for_approval(headline: str, fingerprint: str) -> None:
    """Tell the approver that the current run waits: what, where to read it, how to answer."""
    flow_run = current_flow_run()
    lines = [f"migrate run {flow_run.name} waits for approval: {headline} (plan {fingerprint})"]
    url = run_url(flow_run.id)
    if url:
        lines.append(f"read the plan and answer: {url}")
    lines.append(f"or from a terminal: python flows/approve.py {flow_run.id} --approve "
                 f"--approver YOUR_NAME --fingerprint {fingerprint}")
    _send("\n".join(lines))


def run_ended(flow, flow_run, state) -> None:
    """Flow state hook: tell how the run ended, in the final state's one line."""
    reason = (state.message or state.name or "").splitlines()[0] if (state.message or state.name) else ""
    verb = "completed" if state.is_completed() else ("cancelled" if state.is_cancelled() else "failed")
    text = f"migrate run {flow_run.name} {verb}: {reason}"
    url = run_url(flow_run.id)
    _send(f"{text}\n{url}" if url else text)
