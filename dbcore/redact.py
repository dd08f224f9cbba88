"""Keeping secrets out of text: one scrubber for every message, log line, state and notification.

A leaf module (it imports nothing of dbcore), so that settings, errors and every layer above can
use it without a cycle.

:func:`redact` (and :func:`error_line`, :func:`scrub`) replace, besides the secrets a caller
names, every secret in play in this process: the password of any database URL held by an
environment variable (however the URL is written: a password with an unescaped ``#``, ``?`` or
``/`` included), ``AWS_SECRET_ACCESS_KEY``, the token part of ``MIGRATE_NOTIFY_URL``, and the
value of every variable named like ``*PASSWORD*``, ``*SECRET*`` or ``*TOKEN*`` of at least 8
characters. It reads the environment itself, each time (the one exception to "the environment
is read in dbcore/settings.py"): a secret must be known wherever text is made, in a flow's
task, a log record or the CLI's error line, without threading it through every call.
:func:`install_log_scrubber` makes every log record of the process pass through it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import traceback
from dataclasses import dataclass
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, quote, quote_plus, unquote, urlencode, urlsplit

MASK = "***"
#: a variable whose value is a secret by its name alone (when the value is this long at least)
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|AUTH_STRING", re.IGNORECASE)
SECRET_MIN_LENGTH = 8

# What follows the "@" of a database URL: host (or [IPv6]), port, /database, ?query. Neither
# host, port nor database may hold an "@": the first "@" after which this matches ends the
# user info, so a password may hold "@", "#", "?" or "/" unescaped.
_AFTER_USERINFO = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.%a-z]*\]|[^/?#@\[\]:]*)(?::(?P<port>[^/?#@]*))?"
    r"(?P<path>/[^?@]*)?(?:\?(?P<query>.*))?", re.DOTALL)
_SCHEME = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<rest>.*)$", re.DOTALL)


@dataclass(frozen=True)
class DbUrl:
    """A database URL taken apart: user and password unquoted, the rest as written."""

    scheme: str
    user: str | None
    password: str | None
    host: str
    port: str
    path: str
    query: str

    def canonical(self) -> str:
        """Return the URL with user and password percent-encoded (what every parser reads the same)."""
        auth = ""
        if self.user is not None or self.password is not None:
            auth = quote(self.user or "", safe="")
            if self.password is not None:
                auth += ":" + quote(self.password, safe="")
            auth += "@"
        port = f":{self.port}" if self.port else ""
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{auth}{self.host}{port}{self.path}{query}"


def parse_db_url(url: str) -> DbUrl:
    """Return ``url`` taken apart; raise ValueError when it cannot be read as scheme://[user[:password]@]host...

    An unescaped ``#``, ``?``, ``/`` or ``@`` in the password is read as part of it: the user info
    ends at the first ``@`` after which a host, port, database and query follow.
    """
    match = _SCHEME.match(url.strip())
    if not match:
        raise ValueError("not a scheme://... URL")
    scheme, rest = match.group("scheme"), match.group("rest")
    # a user name holds no "/", "?" or "#": an "@" after one of them is in the query
    starts = [i for i, c in enumerate(rest) if c == "@"
              and not any(s in rest[:i].partition(":")[0] for s in "/?#")] + [-1]
    for at in starts:
        after = _AFTER_USERINFO.fullmatch(rest[at + 1:])
        if after is None:
            continue
        user = password = None
        if at >= 0:
            userinfo = rest[:at]
            user, sep, secret = userinfo.partition(":")
            user, password = unquote(user), (unquote(secret) if sep else None)
        return DbUrl(scheme, user, password, after.group("host") or "", after.group("port") or "",
                     after.group("path") or "", after.group("query") or "")
    raise ValueError("cannot tell the password from the host")


def normalize_db_url(url: str) -> str:
    """Return ``url`` with its user and password percent-encoded; raise ValueError when unreadable."""
    return parse_db_url(url).canonical()


def url_password(url: str) -> str | None:
    """Return the (unquoted) password of a postgres URL, from its user info or ``?password=``."""
    try:
        parts = parse_db_url(url)
    except ValueError:
        return _guessed_password(url)
    if parts.password:
        return parts.password
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password" and value:
            return value
    return None


def _guessed_password(url: str) -> str | None:
    """The password of a URL too broken to parse: between the user's ':' and the last '@'."""
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    return password or None


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``; safe to print, log and raise."""
    try:
        parts = parse_db_url(url)
    except ValueError:
        return "<an unparseable database URL>"
    if not parts.scheme.startswith("postgres"):
        return "<a database address that is not a postgres:// URL>"
    auth = ""
    if parts.user is not None or parts.password is not None:
        auth = quote(parts.user or "", safe="") + (f":{MASK}" if parts.password is not None else "") + "@"
    query = urlencode([(k, MASK if k == "password" else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*/")
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{auth}{parts.host}{port}{parts.path}" + (f"?{query}" if query else "")


def webhook_secrets(url: str) -> list[str]:
    """The token parts of a webhook URL: the whole URL, its path and query, its long segments."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return [url]
    found = [url, parts.path + (f"?{parts.query}" if parts.query else "")]
    found += [s for s in parts.path.split("/") if len(s) >= SECRET_MIN_LENGTH]
    found += [v for _, v in parse_qsl(parts.query) if len(v) >= SECRET_MIN_LENGTH]
    if parts.password:
        found.append(unquote(parts.password))
    return [s for s in found if s and s != "/"]


def environment_secrets(environ: Mapping[str, str]) -> list[str]:
    """Return every secret the variables ``environ`` hold (see the module's docstring)."""
    found: list[str] = []
    for name, value in environ.items():
        value = value.strip()
        if not value:
            continue
        if re.match(r"^postgres(ql)?://", value, re.IGNORECASE) or (
                "://" in value and "@" in value and "URL" in name.upper()):
            password = url_password(value)
            if password:
                found.append(password)
            guessed = _guessed_password(value)
            if guessed and guessed != password:
                found += [guessed, unquote(guessed)]
        if name == "MIGRATE_NOTIFY_URL":
            found += webhook_secrets(value)
        if name == "AWS_SECRET_ACCESS_KEY" or (SECRET_NAME.search(name)
                                               and len(value) >= SECRET_MIN_LENGTH):
            found.append(value)
    return found


def _forms(secret: str) -> set[str]:
    """A secret as it may appear in text: raw, URL-quoted, JSON- and repr-escaped."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
             json.dumps(secret)[1:-1], repr(secret)[1:-1]}
    return {f for f in forms if f}


def known_secrets(*extra: str | None) -> list[str]:
    """Return the secrets to scrub: ``extra`` and those of the environment, every form, longest first."""
    forms: set[str] = set()
    for secret in [*extra, *environment_secrets(os.environ)]:
        if secret:
            forms |= _forms(secret)
    return sorted(forms, key=len, reverse=True)


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every given secret, and every secret in play (see above), replaced by ``***``."""
    if not text:
        return text
    for form in known_secrets(*secrets):
        if form in text:
            text = text.replace(form, MASK)
    return text


#: the one scrubber, by the name its callers read best
scrub = redact


def error_line(exc: BaseException, *secrets: str | None) -> str:
    """Return the first line of an error's message (its type when empty), secrets scrubbed."""
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__, *secrets)


def _leaks(exc: BaseException, forms: Iterable[str]) -> bool:
    try:
        shown = f"{exc}\n{exc!r}"
    except Exception:
        return True
    return any(form in shown for form in forms)


def scrub_exception(exc: BaseException, *secrets: str | None) -> BaseException:
    """Scrub the messages of ``exc`` and of the errors chained to it, in place; return it.

    Its type and attributes stay (a retryable error stays retryable). An error whose text stays
    secret after its arguments are scrubbed (a driver's error keeps its own copy) is cut from the
    chain, or, for ``exc`` itself, replaced by a RuntimeError of the scrubbed text.
    """
    forms = known_secrets(*secrets)
    if not forms:
        return exc
    seen: set[int] = set()
    current: BaseException | None = exc
    result = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _leaks(current, forms):
            current.args = tuple(redact(a, *secrets) if isinstance(a, str) else a for a in current.args)
            if _leaks(current, forms):
                if current is exc:
                    result = RuntimeError(f"{type(exc).__name__}: {redact(str(exc), *secrets)}")
                    result.__traceback__ = exc.__traceback__
                    break
                current.args = (MASK,)
        for linked in (current.__cause__, current.__context__):
            if linked is not None and _leaks(linked, forms):
                linked.args = tuple(redact(a, *secrets) if isinstance(a, str) else a
                                    for a in linked.args)
                if _leaks(linked, forms):
                    current.__cause__ = current.__context__ = None
                    current.__suppress_context__ = True
        current = current.__cause__ or current.__context__
    return result


class ScrubbingFilter(logging.Filter):
    """A logging filter that scrubs a record's message and traceback (every handler it is on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        scrub_record(record)
        return True


def scrub_record(record: logging.LogRecord) -> logging.LogRecord:
    """Scrub a log record in place: its message (arguments merged in), traceback and stack."""
    if getattr(record, "_dbmigrate_scrubbed", False):
        return record
    try:
        message = record.getMessage()
    except Exception:  # a bad %-format: keep what was given, as text
        message = f"{record.msg} {record.args!r}"
    record.msg, record.args = redact(message), None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)
    record._dbmigrate_scrubbed = True
    return record


_installed = False


def install_log_scrubber() -> None:
    """Make every log record this process creates pass through the scrubber (once per process).

    A record factory, not a handler filter: every handler (Prefect's API handler that writes the
    ``log`` table, the console, a test's capture) sees the record already scrubbed, whichever
    logger made it and whenever the handler was added.
    """
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        return scrub_record(previous(*args, **kwargs))

    logging.setLogRecordFactory(factory)
    _installed = True
