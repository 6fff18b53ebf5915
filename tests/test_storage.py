"""ppcl.storage against a real S3 server (SeaweedFS) and the local filesystem."""

from __future__ import annotations

import hashlib
import os

import pytest

from ppcl import storage
from ppcl.errors import PPCLError

MiB = 1024 * 1024


@pytest.fixture
def s3(s3_server, monkeypatch):
    for k in ("PPCL_S3_ENDPOINT", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PPCL_S3_MAX_ATTEMPTS", "2")
    return s3_server


def test_parse_and_join():
    p = storage.parse_s3_uri("s3://bucket/a/b.parquet")
    assert (p.bucket, p.key) == ("bucket", "a/b.parquet")
    assert storage.parse_s3_uri("s3://bucket").key == ""
    assert storage.join("s3://b/x/", "y", "z.json") == "s3://b/x/y/z.json"
    with pytest.raises(PPCLError, match="no bucket"):
        storage.parse_s3_uri("s3:///key")


def test_multipart_roundtrip_verifies_sha256(s3, tmp_path):
    bucket = s3.make_bucket("roundtrip")
    src = tmp_path / "big.bin"
    data = os.urandom(11 * MiB + 123)
    src.write_bytes(data)
    uri = f"{bucket}/models/big.bin"
    digest = storage.upload_file(src, uri, multipart_threshold=5 * MiB, part_size=5 * MiB)
    assert digest == hashlib.sha256(data).hexdigest()
    meta = storage.head(uri)
    assert meta["size"] == len(data)
    assert meta["metadata"]["sha256"] == digest
    assert meta["etag"].endswith("-3")  # three parts: it really went up as multipart
    out = tmp_path / "dl" / "big.bin"
    assert storage.download_file(uri, out) == digest
    assert out.read_bytes() == data
    assert [p.name for p in out.parent.iterdir()] == ["big.bin"]  # no temporary left beside it
    # Seekable ranged reads.
    with storage.open_read(uri) as f:
        f.seek(5 * MiB - 2)
        assert f.read(4) == data[5 * MiB - 2 : 5 * MiB + 2]
    assert storage.list_files(f"{bucket}/models") == [uri]
    assert storage.exists(uri) and not storage.exists(f"{bucket}/models/nothing")


def test_failed_multipart_leaves_no_object(s3, tmp_path, monkeypatch):
    bucket = s3.make_bucket("partial")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(11 * MiB))
    real_md5 = storage._md5
    calls = []

    def corrupt_second_part(data):  # fault injection: the 2nd part's Content-MD5 is wrong
        calls.append(1)
        hexd, b64 = real_md5(data)
        return (hexd, real_md5(b"x")[1]) if len(calls) >= 2 else (hexd, b64)

    monkeypatch.setattr(storage, "_md5", corrupt_second_part)
    with pytest.raises(PPCLError, match="partial/f.bin"):
        storage.upload_file(src, f"{bucket}/f.bin", multipart_threshold=5 * MiB, part_size=5 * MiB,
                            retries=2, backoff_s=0.01)  # fmt: skip
    assert not storage.exists(f"{bucket}/f.bin")
    uploads = s3.client().list_multipart_uploads(Bucket="partial").get("Uploads", [])
    assert uploads == []  # aborted, not left dangling


def test_dir_roundtrip(s3, tmp_path):
    bucket = s3.make_bucket("dirs")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.txt").write_text("bb")
    sums = storage.upload_dir(src, f"{bucket}/run1")
    assert set(sums) == {"a.txt", "sub/b.txt"}
    dst = tmp_path / "dst"
    assert sorted(storage.download_dir(f"{bucket}/run1", dst)) == ["a.txt", "sub/b.txt"]
    assert (dst / "sub" / "b.txt").read_text() == "bb"


def test_wrong_credentials_name_bucket_not_secret(s3, monkeypatch):
    s3.make_bucket("secured")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(PPCLError) as e:
        storage.read_bytes("s3://secured/x.txt")
    msg = str(e.value)
    assert "s3://secured/x.txt" in msg and "access denied" in msg
    assert "definitely-wrong-secret" not in msg and "\n" not in msg


def test_missing_bucket(s3):
    with pytest.raises(PPCLError, match="bucket 'nosuchbucket' does not exist"):
        storage.read_bytes("s3://nosuchbucket/x.txt")
    with pytest.raises(PPCLError, match="bucket 'nosuchbucket' does not exist"):
        storage.list_files("s3://nosuchbucket/prefix")


def test_unreachable_endpoint(monkeypatch):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("PPCL_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(PPCLError, match=f"127.0.0.1:{port} is unreachable"):
        storage.read_bytes("s3://bucket/key")


def test_local_paths(tmp_path):
    f = tmp_path / "a" / "b.bin"
    storage.write_bytes(f, b"xyz")
    assert storage.read_bytes(f) == b"xyz"
    assert storage.list_files(tmp_path) == [str(f)]
    with pytest.raises(PPCLError, match="does not exist"):
        storage.list_files(tmp_path / "missing")


def test_part_etag_mismatch_is_resent_then_refused(s3, tmp_path, monkeypatch):
    """The hook on the transfer manager's UploadPart compares each part's ETag with the MD5 we computed: a
    mismatch on every try is refused naming the object, and neither an object nor an open upload is left."""
    bucket = s3.make_bucket("etags")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(11 * MiB))
    real_md5 = storage._md5
    monkeypatch.setattr(storage, "_md5", lambda data: ("0" * 32, real_md5(data)[1]))  # right header, wrong record
    with pytest.raises(PPCLError, match=r"cannot upload to s3://etags/f.bin: checksum mismatch after retries"):
        storage.upload_file(src, f"{bucket}/f.bin", multipart_threshold=5 * MiB, part_size=5 * MiB,
                            retries=2, backoff_s=0.01)  # fmt: skip
    assert not storage.exists(f"{bucket}/f.bin")
    assert s3.client().list_multipart_uploads(Bucket="etags").get("Uploads", []) == []


def test_small_upload_and_ranged_download(s3, tmp_path, monkeypatch):
    """Below the threshold: one PutObject (plain-MD5 ETag checked); a download in several concurrent ranges
    reassembles the exact bytes."""
    bucket = s3.make_bucket("ranges")
    data = os.urandom(3 * MiB + 7)
    src = tmp_path / "small.bin"
    src.write_bytes(data)
    uri = f"{bucket}/small.bin"
    storage.upload_file(src, uri)
    assert storage.head(uri)["etag"] == hashlib.md5(data).hexdigest()
    monkeypatch.setattr(storage, "DOWNLOAD_PART_SIZE", 1 * MiB)  # 4 ranges
    out = tmp_path / "out.bin"
    assert storage.download_file(uri, out) == hashlib.sha256(data).hexdigest()
    assert out.read_bytes() == data


def test_corrupt_download_is_refused_and_leaves_nothing(s3, tmp_path):
    bucket = s3.make_bucket("corrupt")
    s3.client().put_object(Bucket="corrupt", Key="x.bin", Body=b"abc", Metadata={"sha256": "0" * 64})
    out = tmp_path / "dl" / "x.bin"
    with pytest.raises(PPCLError, match=r"download of s3://corrupt/x.bin is corrupt"):
        storage.download_file(f"{bucket}/x.bin", out)
    assert list(out.parent.iterdir()) == []  # no file, no temporary


def test_stalled_endpoint_reports_within_budget(monkeypatch):
    """A server that accepts and never answers: one line naming the endpoint after attempts x timeout."""
    import socket
    import time

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)  # the kernel completes the handshakes; nobody ever reads or answers
    url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    monkeypatch.delenv("PPCL_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("PPCL_S3_TIMEOUT", "1")
    monkeypatch.setenv("PPCL_S3_MAX_ATTEMPTS", "2")
    t0 = time.monotonic()
    try:
        with pytest.raises(PPCLError, match=f"S3 endpoint {url} did not answer within 1 s \\(2 attempts"):
            storage.read_bytes("s3://bucket/key")
    finally:
        srv.close()
    assert time.monotonic() - t0 < 2 * 1 + 2 + 1  # attempts x timeout + botocore's backoff (<= 2 s) + slack


def test_object_failing_final_verification_is_removed(s3, tmp_path, monkeypatch):
    """Complete but not what we sent (the assembled multipart ETag differs): removed, never left for readers."""
    bucket = s3.make_bucket("verify")
    src = tmp_path / "f.bin"
    src.write_bytes(os.urandom(11 * MiB))
    real = storage._file_digests
    monkeypatch.setattr(storage, "_file_digests", lambda p, n: (*real(p, n)[:2], [b"\0" * 16] * 3))
    with pytest.raises(PPCLError, match=r"upload to s3://verify/f.bin failed verification: ETag .*-3 != "):
        storage.upload_file(src, f"{bucket}/f.bin", multipart_threshold=5 * MiB, part_size=5 * MiB)
    assert not storage.exists(f"{bucket}/f.bin")
    with pytest.raises(PPCLError, match="its sha256 is"):
        storage.upload_file(src, f"{bucket}/f.bin", sha256="0" * 64)
