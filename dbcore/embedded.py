"""What `make run` recorded of the embedded services it started: the read side of ``dbcore/services/``.

``python -m dbcore.services up`` starts a private PostgreSQL cluster and an S3-compatible server
under ``.local/`` and writes their addresses to ``.local/services.json``. The runtime layers read
that record here and never import ``dbcore/services/`` (the local-dev and test helpers) themselves.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from dbcore.settings import Settings

#: the bucket `make run` creates on the embedded server, used when no bucket is configured
LOCAL_BUCKET = "dbmigrate-local"


@dataclass(frozen=True)
class EmbeddedS3:
    """The embedded S3-compatible server: where it listens and its local-only keys."""

    endpoint_url: str
    bucket: str
    access_key: str
    secret_key: str


def local_services_file(settings: Settings) -> Path:
    """Return the path of the file where `make run` records the embedded services it started."""
    return settings.local_dir / "services.json"


def read_record(settings: Settings) -> dict:
    """Return what `make run` recorded (empty when nothing is)."""
    path = local_services_file(settings)
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def embedded_database_url(settings: Settings) -> str | None:
    """Return the URL of the embedded local cluster started by `make run`, if it is recorded."""
    return read_record(settings).get("database_url") or None


def local_prefect_api(settings: Settings) -> str | None:
    """Return the URL of the local Prefect API `make run` started, if it is recorded and accepts connections."""
    url = read_record(settings).get("prefect_api_url")
    return url if url and _accepts(url) else None


def _accepts(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname, parts.port), timeout=2):
            return True
    except OSError:
        return False


def embedded_s3(settings: Settings) -> EmbeddedS3 | None:
    """Return the embedded S3 server if `make run` recorded one and it accepts connections, else None."""
    record = read_record(settings)
    endpoint, key, secret = (record.get(k) for k in ("s3_endpoint_url", "s3_access_key", "s3_secret_key"))
    if not (endpoint and key and secret and _accepts(endpoint)):
        return None
    return EmbeddedS3(endpoint, record.get("s3_bucket") or LOCAL_BUCKET, key, secret)
