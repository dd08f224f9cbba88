"""The S3 side of backups: which bucket, a boto3 client with short timeouts, multipart upload, errors.

Any S3-compatible server works (AWS S3, Tigris, MinIO, SeaweedFS) through ``endpoint_url``;
credentials come from boto3's own chain, except for the embedded server `make run` starts, whose
local-only keys are read from its folder. Errors become one line naming the endpoint, the bucket
and the fix, and never the secret key.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator

import boto3
import botocore.loaders
import botocore.session
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from dbcore.embedded import embedded_s3
from dbcore.errors import ConfigError
from dbcore.redact import redact
from dbcore.settings import Settings

log = logging.getLogger(__name__)

#: a dead endpoint must fail a backup in seconds, not after botocore's 60 s x 5 attempts
CONNECT_TIMEOUT = 5
# a hung server fails a backup in about a minute, not several (parts in flight each wait)
READ_TIMEOUT = 20
MAX_ATTEMPTS = 2
#: 16 MiB parts: S3 allows 10,000 parts, so up to 160 GB stored per backup
PART_SIZE = 16 * 1024 * 1024
#: parts uploading while the next one is compressed; bounds memory to about (2 + 1) parts
PARTS_IN_FLIGHT = 2
#: a single CopyObject is limited to 5 GB; above that boto3 copies in parts
COPY_CONFIG = TransferConfig(multipart_threshold=5 * 1024**3, multipart_chunksize=512 * 1024**2)

_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden",
           "InvalidToken", "ExpiredToken", "AllAccessDisabled"}
_NO_BUCKET = {"NoSuchBucket"}
_NO_KEY = {"NoSuchKey", "404", "NotFound"}


@dataclass(frozen=True)
class Storage:
    """A bucket and key prefix on an S3-compatible endpoint, with the client to reach it."""

    bucket: str
    prefix: str
    endpoint_url: str  # "" means AWS
    client: Any = field(repr=False, compare=False)
    #: the secret key in use, only to scrub it from any message
    secret: str | None = field(default=None, repr=False, compare=False)

    @property
    def where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint_url or 'AWS'}"


_loader: botocore.loaders.Loader | None = None
_loader_lock = threading.Lock()


def _session() -> boto3.session.Session:
    """Return a new boto3 session (credentials resolved afresh) sharing one loader of service models.

    Reading and parsing botocore's JSON models is most of the ~0.1 s a new S3 client costs;
    the models never change within a process, the credentials and region may.
    """
    global _loader
    with _loader_lock:
        core = botocore.session.get_session()
        if _loader is None:
            _loader = botocore.loaders.create_loader(core.get_config_variable("data_path"))
        core.register_component("data_loader", _loader)
        session = boto3.session.Session(botocore_session=core)
        # boto3 appends its own data folder to the loader's search path at every session
        _loader.search_paths[:] = dict.fromkeys(_loader.search_paths)
    return session


def open_storage(settings: Settings, env: str | None = None) -> Storage:
    """Return the configured bucket (or, for local work, the embedded `make run` one).

    Raises ConfigError when there is none.

    ``env`` is the environment of the database being backed up or restored: a production or
    proxy backup never lands on a laptop's embedded server.
    """
    config = Config(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        # path-style addressing: custom endpoints rarely resolve bucket subdomains
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
    )
    prefix = settings.s3_prefix.strip("/")
    if not settings.s3_bucket and not settings.s3_endpoint_url:
        if env not in (None, "local"):
            raise ConfigError(f"no backup bucket for the {env} database: set MIGRATE_S3_BUCKET "
                              "(and MIGRATE_S3_ENDPOINT_URL unless it is on AWS)")
        server = embedded_s3(settings)
        if server is None:
            raise ConfigError(
                "no backup bucket: set MIGRATE_S3_BUCKET (and MIGRATE_S3_ENDPOINT_URL unless it "
                "is on AWS), or run `make run` to start the embedded S3 server"
            )
        client = _session().client(
            "s3", endpoint_url=server.endpoint_url, region_name="us-east-1", config=config,
            aws_access_key_id=server.access_key, aws_secret_access_key=server.secret_key,
        )
        return Storage(server.bucket, prefix, server.endpoint_url, client, server.secret_key)
    if not settings.s3_bucket:
        raise ConfigError(
            f"MIGRATE_S3_ENDPOINT_URL is {settings.s3_endpoint_url} but no bucket is set: "
            "set MIGRATE_S3_BUCKET"
        )
    session = _session()
    # custom endpoints ignore the region, but botocore wants one to sign with
    region = session.region_name or ("us-east-1" if settings.s3_endpoint_url else None)
    client = session.client("s3", endpoint_url=settings.s3_endpoint_url or None,
                            region_name=region, config=config)
    credentials = session.get_credentials()
    secret = credentials.secret_key if credentials else None
    return Storage(settings.s3_bucket, prefix, settings.s3_endpoint_url, client, secret)


def describe_error(exc: BaseException, storage: Storage) -> str:
    """Return one line saying what went wrong with the storage and how to fix it (no secret in it)."""
    if isinstance(exc, NoCredentialsError):
        text = "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
    elif isinstance(exc, _UNREACHABLE):
        text = (f"S3 endpoint {storage.endpoint_url or 'AWS'} is unreachable "
                f"({type(exc).__name__}): check MIGRATE_S3_ENDPOINT_URL and that the server is running")
    elif isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        operation = getattr(exc, "operation_name", "request")
        if code in _NO_BUCKET or (code in _NO_KEY and operation == "HeadBucket"):
            text = (f"bucket {storage.bucket} does not exist at {storage.endpoint_url or 'AWS'}: "
                    "create it, or set MIGRATE_S3_BUCKET to an existing bucket")
        elif code in _DENIED:
            text = (f"access denied to {storage.where} ({code}): check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY")
        else:
            text = f"S3 {operation} failed on {storage.where}: {code} {error.get('Message', '')}".strip()
    elif isinstance(exc, BotoCoreError):
        text = f"S3 error on {storage.where}: {exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    return redact(text.splitlines()[0] if text else type(exc).__name__, storage.secret)


def is_transient(exc: BaseException) -> bool:
    """Return True for failures worth repeating as they are: the endpoint unreachable, or a 5xx."""
    if isinstance(exc, _UNREACHABLE):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return int(status) >= 500
    return False


def is_missing_key(exc: BaseException) -> bool:
    """Return True when ``exc`` says the object does not exist."""
    return isinstance(exc, ClientError) and str(exc.response.get("Error", {}).get("Code")) in _NO_KEY


class MultipartUpload:
    """One object written part by part; ``abort()`` leaves nothing behind, ``complete()`` publishes it."""

    def __init__(self, storage: Storage, key: str, content_type: str = "application/octet-stream"):
        self.storage = storage
        self.key = key
        self.content_type = content_type
        self.upload_id: str | None = None
        self._parts: list[dict] = []
        self._pending: deque[Future] = deque()
        self._pool = ThreadPoolExecutor(max_workers=PARTS_IN_FLIGHT, thread_name_prefix="s3-part")

    def start(self) -> None:
        """Create the multipart upload."""
        response = self.storage.client.create_multipart_upload(
            Bucket=self.storage.bucket, Key=self.key, ContentType=self.content_type
        )
        self.upload_id = response["UploadId"]

    def put(self, data: bytes) -> None:
        """Queue the next part (at least 5 MiB unless it is the last); blocks while too many are in flight."""
        number = len(self._pending) + len(self._parts) + 1
        while len(self._pending) >= PARTS_IN_FLIGHT:
            self._parts.append(self._pending.popleft().result())
        self._pending.append(self._pool.submit(self._upload_part, number, data))

    def _upload_part(self, number: int, data: bytes) -> dict:
        response = self.storage.client.upload_part(
            Bucket=self.storage.bucket, Key=self.key, UploadId=self.upload_id,
            PartNumber=number, Body=data,
        )
        part = {"PartNumber": number, "ETag": response["ETag"]}
        # botocore adds a CRC32 to every part by default; complete must repeat it
        part.update({k: v for k, v in response.items() if k.startswith("Checksum") and k != "ChecksumType"})
        return part

    def complete(self) -> None:
        """Wait for the queued parts and publish the object."""
        while self._pending:
            self._parts.append(self._pending.popleft().result())
        self._pool.shutdown()
        self.storage.client.complete_multipart_upload(
            Bucket=self.storage.bucket, Key=self.key, UploadId=self.upload_id,
            MultipartUpload={"Parts": sorted(self._parts, key=lambda p: p["PartNumber"])},
        )

    def abort(self) -> bool:
        """Drop the upload and its parts; return False if S3 could not be told (it may be what failed)."""
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.upload_id is None:
            return True
        try:
            self.storage.client.abort_multipart_upload(
                Bucket=self.storage.bucket, Key=self.key, UploadId=self.upload_id
            )
        except (BotoCoreError, ClientError) as exc:
            log.warning("could not abort the multipart upload of %s: %s (a bucket lifecycle rule "
                        "AbortIncompleteMultipartUpload cleans such leftovers)",
                        self.key, describe_error(exc, self.storage))
            return False
        return True


def replace_metadata(storage: Storage, key: str, metadata: dict[str, str], content_type: str) -> None:
    """Set the user metadata of an existing object (copied onto itself: S3 cannot edit it in place)."""
    storage.client.copy(
        {"Bucket": storage.bucket, "Key": key}, storage.bucket, key,
        ExtraArgs={"Metadata": metadata, "MetadataDirective": "REPLACE", "ContentType": content_type},
        Config=COPY_CONFIG,
    )


def head(storage: Storage, key: str) -> dict:
    """Return the object's HEAD response (ContentLength, Metadata, ...)."""
    return storage.client.head_object(Bucket=storage.bucket, Key=key)


def read_chunks(storage: Storage, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
    """Yield the object's bytes in chunks, streamed."""
    body = storage.client.get_object(Bucket=storage.bucket, Key=key)["Body"]
    try:
        yield from body.iter_chunks(chunk_size)
    finally:
        body.close()


def list_objects(storage: Storage, prefix: str) -> Iterator[dict]:
    """Yield every object (Key, Size, LastModified) under ``prefix``."""
    paginator = storage.client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=storage.bucket, Prefix=prefix):
        yield from page.get("Contents", [])


def delete(storage: Storage, key: str) -> None:
    """Delete one object."""
    storage.client.delete_object(Bucket=storage.bucket, Key=key)


def unfinished_uploads(storage: Storage, prefix: str) -> list[tuple[str, str]]:
    """Return (key, upload id) of every multipart upload under ``prefix`` not completed nor aborted."""
    paginator = storage.client.get_paginator("list_multipart_uploads")
    return [(u["Key"], u["UploadId"])
            for page in paginator.paginate(Bucket=storage.bucket, Prefix=prefix)
            for u in page.get("Uploads", [])]


def abort_upload(storage: Storage, key: str, upload_id: str) -> None:
    """Drop an unfinished multipart upload and its parts."""
    storage.client.abort_multipart_upload(Bucket=storage.bucket, Key=key, UploadId=upload_id)
