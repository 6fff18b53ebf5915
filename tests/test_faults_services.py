"""Fault corpus for the services: credentials in URIs, dead / stalled S3 and MLflow endpoints, long captions.

Each row runs the real ``ppcl`` command (``ppcl.cli.main``) and checks: exit status 2, one line on stderr with the
expected fragment, no secret echoed, and nothing left behind (the working folder's checksums are unchanged).
The endpoints are sockets on 127.0.0.1: one that accepts connections and never answers (stalled), and a port
with nothing listening (dead). Timeouts are set to 2 s here so the corpus stays fast; the time to error is
asserted against the documented budget (attempts x timeout + backoff).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from ppcl import storage, tracking
from ppcl.cli import main
from ppcl.errors import PPCLError

SECRET = "s3cr3t/Pa55+word"


# ------------------------------------------------------------------------------------------- endpoints
class StalledServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte (a hung load balancer, a stopped pod)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self):
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.fixture(scope="module")
def stalled():
    server = StalledServer()
    yield f"http://127.0.0.1:{server.port}"
    server.close()


@pytest.fixture(scope="module")
def dead():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def fast_fail(monkeypatch):
    for k in ("PPCL_S3_ENDPOINT", "AWS_SESSION_TOKEN", "AWS_PROFILE", "MLFLOW_TRACKING_URI",
              "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
              "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "PPCL_S3_MAX_ATTEMPTS", "PPCL_MLFLOW_MAX_RETRIES"):  # fmt: skip
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("PPCL_S3_TIMEOUT", "2")
    monkeypatch.setenv("PPCL_MLFLOW_TIMEOUT", "2")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ppcltestkey")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ppcltestsecret")


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


def _run(argv: list[str], cwd: Path, capsys) -> tuple[int, str, float]:
    before = _tree(cwd)
    old = os.getcwd()
    os.chdir(cwd)
    t0 = time.monotonic()
    try:
        code = main(argv)
    finally:
        os.chdir(old)
    took = time.monotonic() - t0
    err = capsys.readouterr().err
    assert _tree(cwd) == before, "the command left files behind or changed them"
    return code, err, took


# --------------------------------------------------------------------------------- credentials in URIs
CONFIG_CREDENTIALS = [
    ("teacher", {"teacher": f"s3://AKIAEXAMPLE:{SECRET}@models/flux"}, "field 'teacher'"),
    ("data.source", {"teacher": "t", "data": {"source": f"s3://AKIAEXAMPLE:{SECRET}@data/cc12m"}},
     "field 'data.source'"),
    ("tracking.mlflow_uri", {"teacher": "t", "tracking": {"mlflow_uri": f"https://admin:{SECRET}@mlflow.example"}},
     "field 'tracking.mlflow_uri'"),
]  # fmt: skip


@pytest.mark.parametrize("action", ["compile", "run", "submit"])
@pytest.mark.parametrize(("case", "config", "fragment"), CONFIG_CREDENTIALS, ids=[c[0] for c in CONFIG_CREDENTIALS])
def test_pipeline_refuses_credentials_in_config(action, case, config, fragment, tmp_path, capsys):
    (tmp_path / "run.yaml").write_text(json.dumps(config))  # JSON is YAML
    argv = {"compile": ["pipeline", "compile", "--config", "run.yaml", "--out", "p.yaml"],
            "run": ["pipeline", "run", "--local", "--config", "run.yaml"],
            "submit": ["pipeline", "submit", "--host", "http://127.0.0.1:9", "--config", "run.yaml"]}[action]  # fmt: skip
    code, err, _ = _run(argv, tmp_path, capsys)
    assert code == 2
    assert err.startswith("ppcl pipeline: error: run.yaml: " + fragment) and "credentials" in err
    assert SECRET not in err and "AKIAEXAMPLE" not in err and "admin" not in err
    assert err.count("\n") == 1


FLAG_CREDENTIALS = [
    ("compare --tracking-uri", ["compare", "--experiment", "e", "--tracking-uri", f"http://user:{SECRET}@127.0.0.1:9"],
     "--tracking-uri"),
    ("submit --host", ["pipeline", "submit", "--host", f"https://me:{SECRET}@kfp.example", "--config", "x.yaml"],
     "--host"),
    ("shard --source", ["shard", "--source", f"s3://AKIAEXAMPLE:{SECRET}@bucket/raw", "--out", "o", "--shards", "1"],
     "--source"),
    ("encode --model (user only)", ["encode", "--model", "s3://AKIAEXAMPLE@bucket/flux", "--data", "d", "--out", "c"],
     "--model"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "argv", "fragment"), FLAG_CREDENTIALS, ids=[c[0] for c in FLAG_CREDENTIALS])
def test_cli_refuses_credentials_in_flags(case, argv, fragment, tmp_path, capsys):
    code, err, took = _run(argv, tmp_path, capsys)
    assert code == 2
    assert f"error: {fragment} holds a URI with credentials" in err
    assert SECRET not in err and "AKIAEXAMPLE" not in err and err.count("\n") == 1
    assert took < 2  # refused before anything runs or is imported


@pytest.mark.parametrize(("text", "found"), [
    ("s3://bucket/key", None),
    ("s3://bucket/path/a@b.png", None),  # an '@' in a key is not user-info
    ("http://127.0.0.1:5000/api", None),
    ("s3://KEY:sec/ret@bucket/x", "s3://***@bucket/x"),  # a secret with '/' in it
    ("http://user:pw@host:80/p", "http://***@host:80/p"),
    ("https://token@host/", "https://***@host/"),
    ("see s3://k:s@b/x here", "s3://***@b/x"),
])  # fmt: skip
def test_uri_credentials(text, found):
    got = storage.uri_credentials({"a": [text]})
    assert (got and got[1]) == found or (got is None and found is None)
    if found:
        assert got[0] == "a.0"


# --------------------------------------------------------------------------------- dead or stalled S3
@pytest.mark.parametrize("endpoint", ["stalled", "dead"])
def test_s3_endpoint_fails_fast(endpoint, stalled, dead, fast_fail, monkeypatch, tmp_path, capsys):
    url = {"stalled": stalled, "dead": dead}[endpoint]
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    monkeypatch.setenv("PPCL_S3_MAX_ATTEMPTS", "1")  # the retry budget itself: test_storage.py
    code, err, took = _run(["shard", "--no-progress", "--source", "s3://raw/images", "--out", "shards",
                            "--shards", "1"], tmp_path, capsys)  # fmt: skip
    assert code == 2 and err.count("\n") == 1
    assert f"S3 endpoint {url}" in err and "s3://raw/images" in err
    assert ("did not answer within 2 s" if endpoint == "stalled" else "unreachable") in err
    assert "ppcltestsecret" not in err
    assert ("(1 attempt;" if endpoint == "stalled" else "unreachable") in err
    assert took < 8, took  # 1 attempt x 2 s + start-up


def test_s3_timeout_setting_is_checked(monkeypatch):
    monkeypatch.setenv("PPCL_S3_TIMEOUT", "soon")
    with pytest.raises(PPCLError, match="PPCL_S3_TIMEOUT='soon' must be a positive number"):
        storage.s3_client()


# ------------------------------------------------------------------------------ dead or stalled MLflow
@pytest.mark.parametrize("endpoint", ["stalled", "dead"])
def test_compare_fails_fast(endpoint, stalled, dead, fast_fail, monkeypatch, tmp_path, capsys):
    url = {"stalled": stalled, "dead": dead}[endpoint]
    monkeypatch.setenv("PPCL_MLFLOW_MAX_RETRIES", "1")
    code, err, took = _run(["compare", "--experiment", "ppcl", "--tracking-uri", url, "--out", "cmp"], tmp_path, capsys)
    assert code == 2 and err.count("\n") == 1
    assert f"MLflow server {url}" in err
    assert ("did not answer within 2 s (2 attempts" if endpoint == "stalled" else "unreachable") in err
    # 2 attempts x 2 s + a backoff of at most 0.5 s + importing mlflow
    assert took < 20, took


def test_mlflow_limits_keep_user_values(monkeypatch):
    monkeypatch.setenv("PPCL_MLFLOW_TIMEOUT", "3")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # the user's own choice
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    tracking.configure_http()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
    monkeypatch.setenv("PPCL_MLFLOW_TIMEOUT", "4")  # ours may change what we set before
    tracking.configure_http()
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "4"
    monkeypatch.setenv("PPCL_MLFLOW_TIMEOUT", "0")
    with pytest.raises(PPCLError, match="PPCL_MLFLOW_TIMEOUT='0' must be a positive whole number"):
        tracking.configure_http()


# ------------------------------------------------------------------------------------- long captions
def test_long_captions_reported_once_as_a_count(tiny_pipe_dir, tmp_path, capfd):
    import numpy as np
    from PIL import Image

    src = tmp_path / "src"
    src.mkdir()
    long_caption = " ".join(["a red circle above a blue square"] * 300)  # ~10,000 characters
    captions = [long_caption, "a red circle", long_caption, "two green triangles"]
    with open(src / "metadata.jsonl", "w") as f:
        for i, c in enumerate(captions):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(src / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "caption": c}) + "\n")
    assert len(long_caption) > 9000
    assert main(["shard", "--no-progress", "--source", str(src), "--out", str(tmp_path / "data"), "--shards", "2"]) == 0
    capfd.readouterr()
    code = main(["encode", "--no-progress", "--model", str(tiny_pipe_dir["flux"]), "--data", str(tmp_path / "data"),
                 "--out", str(tmp_path / "cache"), "--resolution", "32", "--batch-size", "2"])  # fmt: skip
    out, err = capfd.readouterr()
    assert code == 0
    assert "2 of 4 captions were longer than max_sequence_length (" in err
    assert err.count("were truncated") == 1
    assert "was truncated because" not in err + out
    assert len(err) + len(out) < 4000  # not the cut text of every caption
