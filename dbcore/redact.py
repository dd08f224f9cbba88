"""Keeping secrets out of text: the password of a database URL, masked or scrubbed.

A leaf module (it imports nothing of dbcore), so that settings, errors and every layer above can
use it without a cycle.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

MASK = "***"


def url_password(url: str) -> str | None:
    """Return the (unquoted) password of a postgres URL, from its user info or ``?password=``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password:
        return unquote(password)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "password" and value:
            return value
    return None


def mask_url(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``; safe to print, log and raise."""
    try:
        parts = urlsplit(url)
        if not parts.scheme.startswith("postgres"):
            return "<a database address that is not a postgres:// URL>"
        netloc = parts.netloc
        if parts.password is not None:
            host = parts.hostname or ""
            if ":" in host:  # IPv6 literal
                host = f"[{host}]"
            netloc = f"{parts.username or ''}:{MASK}@{host}" + (f":{parts.port}" if parts.port else "")
        query = urlencode([(k, MASK if k == "password" else v)
                           for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*/")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<an unparseable database URL>"


def error_line(exc: BaseException, *secrets: str | None) -> str:
    """Return the first line of an error's message (its type when empty), secrets scrubbed."""
    text = str(exc).strip()
    return redact(text.splitlines()[0] if text else type(exc).__name__, *secrets)


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every given secret (and its URL-quoted form) replaced by ``***``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK).replace(quote(secret, safe=""), MASK)
    return text
