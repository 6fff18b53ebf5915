"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1, sqlite backend, artifacts to S3.

Usage::

    with S3Server(tmp / "s3") as s3, MlflowServer(tmp / "mlflow", s3, "s3://mlflow/artifacts") as ml:
        ml.uri                     # "http://127.0.0.1:<port>": set MLFLOW_TRACKING_URI to it

The port is a free one picked at start; the server proxies artifacts (``--serve-artifacts``, the default) to
``--artifacts-destination`` on the test S3 server, so clients need no S3 credentials of their own for MLflow
artifacts. Telemetry is off. :meth:`stop` always ends the whole process group (uvicorn workers included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """One ``mlflow server`` process with its sqlite database under ``directory``.

    Args:
        directory: holds ``mlflow.db`` and ``mlflow.log``.
        s3: a started ``tests.s3.S3Server`` (its endpoint and credentials are given to the server only).
        artifacts_destination: ``s3://bucket/prefix`` (the bucket must exist).
    """

    def __init__(self, directory: str | os.PathLike, s3, artifacts_destination: str, *,
                 startup_timeout: float = 90.0):  # fmt: skip
        self.directory = Path(directory)
        self.s3 = s3
        self.artifacts_destination = artifacts_destination
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._log = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts_destination]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        env.update(self.s3.env)
        env.update(MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
        self._log = open(self.directory / "mlflow.log", "wb")
        # Own process group: stop() signals the server and its uvicorn workers, nothing else.
        self.proc = subprocess.Popen(cmd, cwd=self.directory, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self.proc.returncode}; log: {self.directory}/mlflow.log")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server did not answer on {self.uri} within {self.startup_timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # uvicorn may wait for idle keep-alive connections
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
