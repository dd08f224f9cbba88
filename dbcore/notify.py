"""Notifications: one JSON POST of ``{"text": ...}`` (Slack's incoming-webhook shape) to MIGRATE_NOTIFY_URL.

A notification is a courtesy, never a step of the deploy: one that cannot be delivered is
logged and forgotten, within ``MIGRATE_NOTIFY_TIMEOUT`` seconds. The text is scrubbed of the
database password, and the webhook's own URL (it holds a token) is never logged, only its host.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from dbcore.redact import redact
from dbcore.settings import Settings

log = logging.getLogger(__name__)


def _where(url: str) -> str:
    try:
        return urlsplit(url).hostname or "the notification URL"
    except ValueError:
        return "the notification URL"


def notify(settings: Settings, text: str) -> bool:
    """POST ``text`` to MIGRATE_NOTIFY_URL; return True if it was taken (2xx), False otherwise.

    Never raises: an unset URL sends nothing, a failure is a warning in the log.
    """
    if not settings.notify_url:
        return False
    url = settings.notify_url.get_secret_value()
    body = json.dumps({"text": redact(text, *settings.secrets())}).encode()
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=settings.notify_timeout) as response:
            response.read(1024)
        return True
    except urllib.error.HTTPError as exc:
        log.warning("notification not delivered: %s answered HTTP %s", _where(url), exc.code)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        log.warning("notification not delivered to %s: %s", _where(url), reason)
    return False
