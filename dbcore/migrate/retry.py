"""The apply, tried again when it gave up at lock_timeout: nothing was changed, so it is safe.

A busy table makes the apply's DDL wait at most ``lock_timeout`` (the application's queries queue
behind it meanwhile), then the whole batch is rolled back. Trying again at once would queue the
application again: the waits double from ``MIGRATE_LOCK_RETRY_DELAY`` and are jittered by +-50%,
so that several runs (a fleet, a retried deploy) spread out instead of colliding again.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Callable

from dbcore.connection import Target
from dbcore.errors import TableLockTimeout
from dbcore.migrate.isolated import execute_isolated
from dbcore.migrate.plan import Plan, RunReport
from dbcore.settings import Settings

log = logging.getLogger(__name__)


def backoff(base: float, attempt: int, rng: Callable[[], float] = random.random) -> float:
    """Return the wait before retry number ``attempt`` (0-based): ``base * 2**attempt``, +-50%."""
    return base * 2 ** attempt * (0.5 + rng())


def apply_retrying(plan: Plan, target: Target, settings: Settings, *,
                   sleep: Callable[[float], None] = time.sleep, **kwargs) -> RunReport:
    """Apply ``plan`` in a child process (:func:`dbcore.migrate.isolated.execute_isolated`),
    retrying up to ``settings.lock_retries`` times when it gave up at lock_timeout with nothing
    committed.

    Raises the last TableLockTimeout (then no longer retryable) or any other error at once.
    """
    tries = settings.lock_retries + 1
    for attempt in range(tries):
        try:
            return execute_isolated(plan, target, settings, **kwargs)
        except TableLockTimeout as exc:
            if not exc.retryable:  # something was committed: never repeat
                raise
            if attempt + 1 >= tries:
                raise TableLockTimeout(f"{exc} (tried {tries} times)", committed=exc.committed,
                                       retryable=False) from exc
            wait = backoff(settings.lock_retry_delay, attempt)
            log.warning("apply gave up at lock_timeout=%s, nothing changed (try %d of %d); "
                        "trying again in %.1fs", settings.lock_timeout, attempt + 1, tries, wait)
            sleep(wait)
    raise AssertionError("unreachable")  # the loop always returns or raises
