"""One I/O layer for local paths and ``s3://bucket/key`` URIs (AWS S3, MinIO, SeaweedFS, any S3 API).

Every stage that reads or writes an artifact goes through these functions, so a path argument can always be
either a local path or an S3 URI.

Configuration comes from the environment only, never from a config file or an argument:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), the endpoint from
``PPCL_S3_ENDPOINT`` or ``AWS_ENDPOINT_URL`` (MinIO/SeaweedFS; path-style addressing is used when an endpoint
is set), the region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default ``us-east-1``). Without keys in the
environment boto3's standard chain applies (IRSA web identity, instance roles). Credentials never appear in
messages, and a URI that carries them (``s3://KEY:SECRET@bucket/...``) is refused wherever a setting or flag
holds one (:func:`refuse_uri_credentials`): the CLI checks every flag, the config loader every field.

Dead services fail fast (design choice: a stalled endpoint must not hold a GPU job silently for minutes).
``PPCL_S3_TIMEOUT`` (seconds, default 10) bounds the TCP connect and every socket read; ``PPCL_S3_MAX_ATTEMPTS``
(default 3, botocore's own default) is botocore's "standard" retry budget per request (throttling, 5xx, connection
errors and timeouts; exponential backoff of at most 2 + 4 s). A dead or stalled endpoint therefore gives a one-line
error naming the endpoint within attempts x timeout + backoff = 36 s at the defaults (measured: 54 s with 4
attempts, 2 s for a port with nothing listening). No retry loop of ours sits on top of
botocore's for those errors: ours re-sends only what botocore cannot see (a checksum mismatch, a response body
cut off after the headers arrived).

Transfers go through boto3's transfer manager (s3transfer): files of ``MULTIPART_THRESHOLD`` bytes or more in
parts of ``PART_SIZE`` bytes, ``PPCL_S3_CONCURRENCY`` (default 8) parts in flight; downloads as concurrent ranged
GETs pinned to the object's ETag (If-Match), written to a temporary and renamed.

Integrity (design choice): uploads are verified twice.
1. Per request, by MD5: every ``PutObject`` / ``UploadPart`` carries ``Content-MD5`` (an event hook on our client
   adds it to the requests the transfer manager makes; the server rejects bytes that do not match), and the
   returned ETag is compared with the MD5 we computed when it has the plain-MD5 form (it does not under SSE-KMS,
   where Content-MD5 alone guards the transfer). The completed multipart object's ETag must equal
   ``md5(concat(part md5s))-N`` for the part size used.
2. End to end, by SHA-256: the file's sha256 is stored as object metadata ``x-amz-meta-sha256``; after the
   upload we HEAD the object and compare its size and recorded sha256; ``download_file`` recomputes the
   sha256 of what it received and compares it with the metadata.
An upload that fails a checksum is sent again (``retries`` times in all, exponential backoff); botocore
retries throttling, 5xx and connection errors. A multipart upload is invisible until completed and the
transfer manager aborts it on any failure, so a partial object never appears under the final key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

from ppcl.atomic import atomic_path
from ppcl.errors import PPCLError

T = TypeVar("T")

#: Files at or above this size are uploaded in parts (bytes). Tests lower it; S3's minimum part is 5 MiB.
MULTIPART_THRESHOLD = 32 * 1024 * 1024
#: Size of one part of a multipart upload (bytes); the transfer manager doubles it for files that would need
#: more than S3's 10,000 parts. 16 MiB keeps several parts in flight for the cache and checkpoint files.
PART_SIZE = 16 * 1024 * 1024
#: Size of one ranged GET of a download (bytes); objects of twice this size or more download in parallel ranges.
DOWNLOAD_PART_SIZE = 8 * 1024 * 1024
_CHUNK = 8 * 1024 * 1024


# ----------------------------------------------------------------------------------------------- URIs
def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


@dataclass(frozen=True)
class S3Path:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Path:
    """``s3://bucket/some/key`` -> S3Path("bucket", "some/key"); the key may be empty (bucket root)."""
    uri = str(uri)
    if not uri.startswith("s3://"):
        raise PPCLError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise PPCLError(f"S3 URI {uri!r} has no bucket name")
    return S3Path(bucket, key)


def join(base: str | os.PathLike, *parts: str) -> str:
    """Join path components for either a local path or an S3 URI (always '/' inside S3)."""
    if is_s3(base):
        out = str(base).rstrip("/")
        for p in parts:
            out = f"{out}/{p.strip('/')}"
        return out
    return str(Path(base, *parts))


# ------------------------------------------------------------------------------------ credentials in URIs
# scheme://<authority>: the authority ends at the first '/', '?' or '#'. A secret may itself hold a '/' (AWS
# secret keys do), so "user:sec/ret@host" must also count: a ':' followed by something other than a port.
_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^\s]*)")


def _userinfo_end(rest: str) -> int:
    """Index of the '@' ending a URI's user-info in ``rest`` (the text after ``://``), or -1 when it has none."""
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        return rest.index("@")
    host, colon, port = authority.partition(":")
    if colon and not port.isdigit() and "@" in rest:  # "KEY:sec/ret@bucket/..." (a port is all digits)
        return rest.index("@")
    return -1


def uri_credentials(value: object, path: str = "") -> tuple[str, str] | None:
    """The first URI with user-info in ``value`` (a string, or dicts/lists of them): ``(dotted path, the URI with
    its user-info replaced by ***)``; None when there is none. The secret itself is never returned."""
    if isinstance(value, str):
        for m in _URI.finditer(value):
            end = _userinfo_end(m.group(2))
            if end >= 0:
                return path, f"{m.group(1)}://***@{m.group(2)[end + 1 :]}"
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}.{i}" if path else str(i), v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = uri_credentials(v, sub)
        if found:
            return found
    return None


def refuse_uri_credentials(value: object, where: str) -> None:
    """Raise a one-line PPCLError when ``value`` holds a URI with user-info (``s3://KEY:SECRET@bucket/...``,
    ``http://user:pw@host``), naming ``where`` (a flag, or a config file's ``"<file>: field"``) and the dotted
    field path, with the user-info masked. Credentials travel only in the environment: a URI ends up in logs,
    MLflow params, compiled pipeline YAML and process listings."""
    found = uri_credentials(value)
    if found is None:
        return
    path, shown = found
    label = f"{where} '{path}'" if path else where
    raise PPCLError(
        f"{label} holds a URI with credentials in it ({shown}); refused: pass credentials only through the "
        "environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD) and remove them from the URI"
    )


# --------------------------------------------------------------------------------------------- client
_CLIENTS: dict[tuple, object] = {}


def endpoint_url() -> str | None:
    return os.environ.get("PPCL_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None


def _env_number(name: str, default: float, kind: type = float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise PPCLError(f"{name}={raw!r} must be a positive {'integer' if kind is int else 'number'}")
    return value


def s3_timeout() -> float:
    """Seconds allowed for the TCP connect and for each socket read (``PPCL_S3_TIMEOUT``, default 10)."""
    return _env_number("PPCL_S3_TIMEOUT", 10.0)


def s3_max_attempts() -> int:
    """botocore attempts per request (``PPCL_S3_MAX_ATTEMPTS``, default 3; see the module docstring)."""
    return int(_env_number("PPCL_S3_MAX_ATTEMPTS", 3, int))


def s3_concurrency() -> int:
    """Parts / ranges in flight per transfer (``PPCL_S3_CONCURRENCY``, default 8)."""
    return int(_env_number("PPCL_S3_CONCURRENCY", 8, int))


def s3_client():
    """A boto3 S3 client configured from the environment (cached per process and per configuration)."""
    import boto3
    from botocore.config import Config

    env = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = endpoint_url()
    attempts, timeout, concurrency = s3_max_attempts(), s3_timeout(), s3_concurrency()
    # The pid is part of the key: boto3 clients must not cross a fork (DataLoader workers).
    cache_key = (os.getpid(), tuple(env.values()), region, endpoint, attempts, timeout, concurrency)
    client = _CLIENTS.get(cache_key)
    if client is None:
        config = Config(
            region_name=region,
            retries={"max_attempts": attempts, "mode": "standard"},
            connect_timeout=timeout,
            read_timeout=timeout,
            max_pool_connections=max(10, concurrency + 2),
            s3={"addressing_style": "path"} if endpoint else {},
            # Send/verify CRC checksums only where the operation requires them: some S3-compatible servers
            # reject the newer default trailing checksums; integrity is checked by MD5/SHA-256 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        kwargs = {}
        if env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]:
            kwargs = {
                "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
                "aws_session_token": env["AWS_SESSION_TOKEN"],
            }
        client = boto3.session.Session().client("s3", endpoint_url=endpoint, config=config, **kwargs)
        for op in ("PutObject", "UploadPart"):
            client.meta.events.register(f"before-call.s3.{op}", _add_content_md5)
            client.meta.events.register(f"after-call.s3.{op}", _check_etag)
        _CLIENTS[cache_key] = client
    return client


def _add_content_md5(params: dict, **_) -> None:
    """botocore hook: give a PutObject / UploadPart request (ours or the transfer manager's) a Content-MD5 header,
    and remember the MD5 for :func:`_check_etag`. The body is a bytes object or a seekable file chunk."""
    body = params.get("body")
    if body is None:
        return
    if isinstance(body, (bytes, bytearray)):
        data = bytes(body)
    else:
        start = body.tell()
        data = body.read()
        body.seek(start)
    md5_hex, md5_b64 = _md5(data)
    params["headers"].setdefault("Content-MD5", md5_b64)
    params.setdefault("context", {})["ppcl_md5"] = md5_hex


def _check_etag(http_response, parsed: dict, context: dict | None = None, **_) -> None:
    """botocore hook: a plain-MD5 ETag that differs from what we sent is a corrupted transfer."""
    md5_hex = (context or {}).get("ppcl_md5")
    etag = str(parsed.get("ETag", "")).strip('"')
    if md5_hex and 200 <= http_response.status_code < 300 and _etag_is_md5(etag) and etag != md5_hex:
        raise _ChecksumMismatch(f"ETag {etag} != MD5 {md5_hex}")


#: Errors botocore does not retry but a second send can cure (the bytes arrived damaged or short).
_RESEND_CODES = {"BadDigest", "IncompleteBody", "InvalidDigest"}
_DENIED_CODES = {
    "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "403",
    "AuthorizationHeaderMalformed", "InvalidSecurity",
}  # fmt: skip


def _is_transient(exc: BaseException) -> bool:
    """Worth sending again by us: what botocore's own retries cannot see. Connection errors, timeouts, throttling
    and 5xx are retried inside botocore (``PPCL_S3_MAX_ATTEMPTS``); retrying them again here would multiply the
    time a dead endpoint takes to report."""
    from botocore.exceptions import ClientError, IncompleteReadError, ResponseStreamingError

    if isinstance(exc, (_ChecksumMismatch, ResponseStreamingError, IncompleteReadError)):
        return True
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code")) in _RESEND_CODES
    return False


class _ChecksumMismatch(Exception):
    """An uploaded part or object whose checksum differs from what we sent (retried like a transient error)."""


def _translate(exc: BaseException, path: S3Path, action: str) -> PPCLError:
    """A botocore exception -> one-line PPCLError naming the bucket/key and the setting to check."""
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        PartialCredentialsError,
        ReadTimeoutError,
    )

    if isinstance(exc, PPCLError):
        return exc
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return PPCLError(f"cannot {action} {path}: no S3 credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)")
    if isinstance(exc, (ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)):
        where = endpoint_url() or "the AWS default endpoint"
        what = "closed the connection" if isinstance(exc, ConnectionClosedError) else "did not answer"
        return PPCLError(
            f"cannot {action} {path}: S3 endpoint {where} {what} within {s3_timeout():g} s "
            f"({s3_max_attempts()} attempt{'s' * (s3_max_attempts() != 1)}; check PPCL_S3_ENDPOINT / AWS_ENDPOINT_URL, or raise PPCL_S3_TIMEOUT)"
        )
    if isinstance(exc, EndpointConnectionError):
        where = endpoint_url() or "the AWS default endpoint"
        return PPCLError(
            f"cannot {action} {path}: S3 endpoint {where} is unreachable "
            "(check PPCL_S3_ENDPOINT / AWS_ENDPOINT_URL)"
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code"))
        if code == "NoSuchBucket":
            return PPCLError(f"cannot {action} {path}: bucket '{path.bucket}' does not exist")
        if code in _DENIED_CODES:
            return PPCLError(
                f"cannot {action} {path}: access denied ({code}; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and the bucket policy)"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            return PPCLError(f"cannot {action} {path}: no such object")
        return PPCLError(f"cannot {action} {path}: S3 error {code}")
    return PPCLError(f"cannot {action} {path}: {type(exc).__name__}: {exc}")


@contextlib.contextmanager
def _s3_errors(path: S3Path, action: str) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except _ChecksumMismatch as e:
        raise PPCLError(f"cannot {action} {path}: checksum mismatch after retries ({e})") from e
    except (BotoCoreError, ClientError) as e:
        err = _translate(e, path, action)
        if "no such object" in str(err):
            # A 404 on HEAD does not say whether the key or the bucket is missing: ask the bucket.
            err = _bucket_or_key_missing(path, action)
        raise err from e


def _bucket_or_key_missing(path: S3Path, action: str) -> PPCLError:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client().head_bucket(Bucket=path.bucket)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
            return PPCLError(f"cannot {action} {path}: bucket '{path.bucket}' does not exist")
    except BotoCoreError:
        pass
    return PPCLError(f"cannot {action} {path}: no such object")


def _retry(fn: Callable[[], T], *, attempts: int, backoff_s: float) -> T:
    """Call ``fn``; on a transient error wait backoff_s * 2**i and try again, ``attempts`` times in all."""
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - filtered just below
            if i == attempts - 1 or not _is_transient(e):
                raise
            time.sleep(backoff_s * (2**i))
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------- read
def exists(uri: str | os.PathLike) -> bool:
    if not is_s3(uri):
        return Path(uri).exists()
    path = parse_s3_uri(str(uri))
    from botocore.exceptions import ClientError

    with _s3_errors(path, "read"):
        try:
            s3_client().head_object(Bucket=path.bucket, Key=path.key)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) not in ("404", "NoSuchKey", "NotFound"):
                raise
            # Distinguish "no key" (False) from "no bucket" (an error).
            err = _bucket_or_key_missing(path, "read")
            if "does not exist" in str(err):
                raise err from e
            return False
    return True


def check_bucket(uri: str) -> None:
    """Fail early (PPCLError naming the bucket) when an s3:// URI's bucket is missing or not accessible."""
    if not is_s3(uri):
        return
    path = parse_s3_uri(str(uri))
    from botocore.exceptions import ClientError

    with _s3_errors(path, "access"):
        try:
            s3_client().head_bucket(Bucket=path.bucket)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code")) in ("404", "NoSuchBucket", "NotFound"):
                raise PPCLError(f"cannot access {path}: bucket '{path.bucket}' does not exist") from e
            raise


def head(uri: str) -> dict:
    """S3 object metadata: {"size": int, "etag": str, "metadata": {...}} (user metadata keys lower-case)."""
    path = parse_s3_uri(uri)
    with _s3_errors(path, "read"):
        r = s3_client().head_object(Bucket=path.bucket, Key=path.key)
    return {"size": r["ContentLength"], "etag": r.get("ETag", "").strip('"'), "metadata": r.get("Metadata", {})}


def list_files(uri: str | os.PathLike) -> list[str]:
    """Every file under a folder / prefix, recursively, sorted; a single file gives itself.

    Returns local paths or s3:// URIs. Hidden entries (names starting with '.') are skipped: they are our
    own temporaries or system files.
    """
    if not is_s3(uri):
        p = Path(uri)
        if p.is_file():
            return [str(p)]
        if not p.is_dir():
            raise PPCLError(f"{p} does not exist")
        out = []
        for root, dirs, files in os.walk(p):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            out.extend(os.path.join(root, f) for f in files if not f.startswith("."))
        return sorted(out)
    path = parse_s3_uri(str(uri))
    client = s3_client()
    out: list[str] = []
    prefixes = [path.key] if not path.key or path.key.endswith("/") else [path.key, path.key + "/"]
    with _s3_errors(path, "list"):
        # An exact key is a single file; otherwise treat the key as a folder prefix.
        if path.key and not path.key.endswith("/"):
            r = client.list_objects_v2(Bucket=path.bucket, Prefix=path.key, MaxKeys=1)
            if r.get("Contents") and r["Contents"][0]["Key"] == path.key:
                return [str(path)]
        prefix = prefixes[-1]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=path.bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                rel = obj["Key"][len(prefix) :]
                if any(part.startswith(".") for part in rel.split("/")) or obj["Key"].endswith("/"):
                    continue
                out.append(f"s3://{path.bucket}/{obj['Key']}")
    return sorted(out)


def size(uri: str | os.PathLike) -> int:
    return head(str(uri))["size"] if is_s3(uri) else Path(uri).stat().st_size


class _S3RangeReader(io.RawIOBase):
    """A seekable read-only file over one S3 object, one ranged GET per (buffered) read."""

    def __init__(self, path: S3Path, size: int):
        self._path, self._size, self._pos = path, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(b), self._size - self._pos)
        if n <= 0:
            return 0
        rng = f"bytes={self._pos}-{self._pos + n - 1}"

        def get() -> bytes:
            return s3_client().get_object(Bucket=self._path.bucket, Key=self._path.key, Range=rng)["Body"].read()

        with _s3_errors(self._path, "read"):
            data = _retry(get, attempts=4, backoff_s=0.5)
        b[: len(data)] = data
        self._pos += len(data)
        return len(data)


def open_read(uri: str | os.PathLike, *, buffer_size: int = _CHUNK) -> IO[bytes]:
    """A binary, seekable file object for a local path or an S3 object (ranged GETs, buffered)."""
    if not is_s3(uri):
        try:
            return open(uri, "rb")
        except OSError as e:
            raise PPCLError(f"cannot read {uri}: {e.strerror}") from e
    path = parse_s3_uri(str(uri))
    return io.BufferedReader(_S3RangeReader(path, head(str(uri))["size"]), buffer_size=buffer_size)


def read_bytes(uri: str | os.PathLike) -> bytes:
    if not is_s3(uri):
        try:
            return Path(uri).read_bytes()
        except OSError as e:
            raise PPCLError(f"cannot read {uri}: {e.strerror}") from e
    path = parse_s3_uri(str(uri))
    with _s3_errors(path, "read"):
        return _retry(
            lambda: s3_client().get_object(Bucket=path.bucket, Key=path.key)["Body"].read(), attempts=4, backoff_s=0.5
        )


# ---------------------------------------------------------------------------------------------- write
def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _md5(data: bytes) -> tuple[str, str]:
    d = hashlib.md5(data, usedforsecurity=False).digest()
    return d.hex(), base64.b64encode(d).decode()


def _etag_is_md5(etag: str) -> bool:
    return len(etag) == 32 and all(c in "0123456789abcdef" for c in etag.lower())


def _transfer_manager(client, threshold: int, part_size: int):
    """boto3's classic (s3transfer) transfer manager over our client: ``s3_concurrency()`` parts in flight, parts of
    ``part_size`` bytes from ``threshold`` bytes on. Downloads retry a broken body stream twice on their own."""
    from boto3.s3.transfer import TransferConfig, create_transfer_manager

    config = TransferConfig(
        multipart_threshold=threshold, multipart_chunksize=part_size, max_concurrency=s3_concurrency(),
        num_download_attempts=2, use_threads=True, preferred_transfer_client="classic",
    )  # fmt: skip
    return create_transfer_manager(client, config)


def _file_digests(local: Path, part_size: int | None) -> tuple[str, str, list[bytes]]:
    """One pass over ``local``: (sha256 hex, md5 hex of the whole file, md5 digest of each ``part_size`` part).
    With ``part_size`` None only the whole file's md5 is computed, with a part size only the parts' (the
    expected ETag of a single PUT or of a multipart upload)."""
    sha, whole, parts = hashlib.sha256(), hashlib.md5(usedforsecurity=False), []
    part = hashlib.md5(usedforsecurity=False)
    filled = 0
    with open(local, "rb") as f:
        while chunk := f.read(_CHUNK):
            sha.update(chunk)
            if not part_size:
                whole.update(chunk)
            while chunk and part_size:
                take = chunk[: part_size - filled]
                part.update(take)
                filled += len(take)
                chunk = chunk[len(take) :]
                if filled == part_size:
                    parts.append(part.digest())
                    part, filled = hashlib.md5(usedforsecurity=False), 0
    if filled:
        parts.append(part.digest())
    return sha.hexdigest(), whole.hexdigest(), parts


def upload_file(
    local: str | os.PathLike,
    uri: str,
    *,
    multipart_threshold: int | None = None,
    part_size: int | None = None,
    retries: int = 4,
    backoff_s: float = 0.5,
    sha256: str | None = None,
) -> str:
    """Upload a local file to ``uri`` (an s3:// URI, or a local path: then an atomic copy); return its sha256.

    Goes through boto3's transfer manager: files of ``multipart_threshold`` bytes or more in parts of
    ``part_size`` bytes (module defaults MULTIPART_THRESHOLD / PART_SIZE), sent concurrently. See the module
    docstring for the checksum scheme; an upload that fails a checksum is sent again, ``retries`` times in all.
    Never leaves a partial object under ``uri``: a failed multipart upload is aborted.
    """
    local = Path(local)
    if not is_s3(uri):
        digest = sha256 or sha256_file(local)
        with atomic_path(uri) as tmp:
            shutil.copyfile(local, tmp)
        return digest
    from s3transfer.utils import ChunksizeAdjuster

    path = parse_s3_uri(uri)
    if not path.key or path.key.endswith("/"):
        raise PPCLError(f"cannot upload to {uri}: the URI names a folder, not an object")
    threshold = MULTIPART_THRESHOLD if multipart_threshold is None else multipart_threshold
    nbytes = local.stat().st_size
    multipart = nbytes >= threshold
    # The transfer manager raises a part size below S3's 5 MiB minimum, or one that would need > 10,000 parts.
    part = ChunksizeAdjuster().adjust_chunksize(max(PART_SIZE if part_size is None else part_size, 1), nbytes)
    digest, md5_whole, part_md5s = _file_digests(local, part if multipart else None)
    if sha256 is not None and sha256 != digest:
        raise PPCLError(f"cannot upload {local} to {uri}: its sha256 is {digest}, not the {sha256} recorded for it")
    client = s3_client()

    def send() -> None:
        with _transfer_manager(client, threshold, part) as manager:
            manager.upload(str(local), path.bucket, path.key, extra_args={"Metadata": {"sha256": digest}}).result()

    with _s3_errors(path, "upload to"):
        _retry(send, attempts=retries, backoff_s=backoff_s)
        # End-to-end check: what the server now holds under the final key is our file.
        r = client.head_object(Bucket=path.bucket, Key=path.key)
    etag = r.get("ETag", "").strip('"')
    expected = (f"{hashlib.md5(b''.join(part_md5s), usedforsecurity=False).hexdigest()}-{len(part_md5s)}"
                if multipart else md5_whole)  # fmt: skip
    problem = None
    if r["ContentLength"] != nbytes or r.get("Metadata", {}).get("sha256") != digest:
        problem = f"size or sha256 differs from {local}"
    elif _etag_is_md5(etag.split("-")[0]) and ("-" in etag) == multipart and etag != expected:
        problem = f"ETag {etag} != {expected}"
    if problem:  # a complete but wrong object must not stay where readers look for it
        with contextlib.suppress(Exception):
            client.delete_object(Bucket=path.bucket, Key=path.key)
        raise PPCLError(f"upload to {uri} failed verification: {problem}")
    return digest


def write_bytes(uri: str | os.PathLike, data: bytes) -> str:
    """Write ``data`` to a local path (atomically) or an S3 object (with sha256 metadata); return sha256."""
    digest = hashlib.sha256(data).hexdigest()
    if not is_s3(uri):
        from ppcl.atomic import write_bytes as _write

        _write(uri, data)
        return digest
    path = parse_s3_uri(str(uri))
    md5_hex, md5_b64 = _md5(data)
    client = s3_client()
    with _s3_errors(path, "write"):
        _retry(
            lambda: client.put_object(
                Bucket=path.bucket, Key=path.key, Body=data, ContentMD5=md5_b64, Metadata={"sha256": digest}
            ),
            attempts=4,
            backoff_s=0.5,
        )
    return digest


def download_file(uri: str, local: str | os.PathLike, *, verify: bool = True) -> str:
    """Download ``uri`` to ``local`` atomically (temporary sibling, renamed when complete); return sha256.

    S3 objects come through boto3's transfer manager (concurrent ranged GETs pinned to the object's ETag, so a
    replaced object cannot be mixed with the old one). With ``verify`` the received bytes' sha256 is compared
    with the object's ``sha256`` metadata when it has one (objects written by :func:`upload_file` do). A local
    ``uri`` is copied.
    """
    local = Path(local)
    if not is_s3(uri):
        with atomic_path(local) as tmp:
            try:
                shutil.copyfile(uri, tmp)
            except OSError as e:
                raise PPCLError(f"cannot read {uri}: {e.strerror}") from e
        return sha256_file(local)
    path = parse_s3_uri(uri)
    expected = head(uri)["metadata"].get("sha256")
    client = s3_client()
    with atomic_path(local) as tmp, _s3_errors(path, "download"):
        with _transfer_manager(client, 2 * DOWNLOAD_PART_SIZE, DOWNLOAD_PART_SIZE) as manager:
            manager.download(path.bucket, path.key, str(tmp)).result()
        got = sha256_file(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if verify and expected and got != expected:
            raise PPCLError(f"download of {uri} is corrupt: sha256 {got} != recorded {expected}")
    return got


def upload_dir(local_dir: str | os.PathLike, uri: str, **kwargs) -> dict[str, str]:
    """Upload every file under ``local_dir`` to the prefix ``uri``; returns {relative path: sha256}.

    For an S3 prefix each object appears whole or not at all, but the folder as a set is not atomic: write a
    marker/manifest last (as the stages do) when readers must see all-or-nothing. A local ``uri`` is copied
    atomically as one folder. ``kwargs`` go to :func:`upload_file`.
    """
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise PPCLError(f"cannot upload {local_dir}: not a folder")
    files = [Path(p) for p in list_files(local_dir)]
    if not is_s3(uri):
        with atomic_path(uri, directory=True) as tmp:
            shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
        return {str(p.relative_to(local_dir)): sha256_file(p) for p in files}
    out = {}
    for p in files:
        rel = p.relative_to(local_dir).as_posix()
        out[rel] = upload_file(p, join(uri, rel), **kwargs)
    return out


def download_dir(uri: str, local_dir: str | os.PathLike) -> list[str]:
    """Download every object under the prefix ``uri`` into ``local_dir`` atomically (as one folder)."""
    files = list_files(uri)
    prefix = str(uri).rstrip("/") + "/"
    if not files:
        raise PPCLError(f"cannot download {uri}: nothing under this prefix")
    rels = []
    with atomic_path(local_dir, directory=True) as tmp:
        for f in files:
            rel = f[len(prefix) :] if f.startswith(prefix) else Path(f).name
            if not is_s3(uri):
                rel = os.path.relpath(f, uri)
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            download_file(f, tmp / rel)
            rels.append(rel)
    return rels


@contextlib.contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created if missing), held for the block; blocks until free.

    Serialises processes of one machine (the torchrun ranks of a node) around shared scratch folders.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch(uri: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """A local copy of ``uri`` (one object or a prefix) at ``dest``, downloaded once; a local ``uri`` passes.

    An existing ``dest`` is reused as it is: downloads are atomic, so one that exists is complete (inputs are
    treated as immutable). Processes of one machine fetching the same ``dest`` at once (torchrun ranks)
    serialise on a lock file beside it: one downloads, the others reuse its copy.
    """
    if not is_s3(uri):
        return Path(uri)
    dest = Path(dest)
    if dest.exists():
        return dest
    with file_lock(dest.with_name(f".{dest.name}.lock")):
        if not dest.exists():
            if list_files(uri) == [str(uri)]:  # an exact object, not a prefix
                download_file(str(uri), dest)
            else:
                download_dir(str(uri), dest)
    return dest


def remove(uri: str | os.PathLike) -> None:
    """Delete one file / object (missing is fine)."""
    if not is_s3(uri):
        with contextlib.suppress(FileNotFoundError):
            Path(uri).unlink()
        return
    path = parse_s3_uri(str(uri))
    with _s3_errors(path, "delete"):
        s3_client().delete_object(Bucket=path.bucket, Key=path.key)
