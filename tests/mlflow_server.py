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
import socket
import sys
from pathlib import Path

from tests.servers import LocalServer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer(LocalServer):
    """One ``mlflow server`` process with its sqlite database under ``directory``.

    Args:
        directory: holds ``mlflow.db`` and ``mlflow.log``.
        s3: a started ``tests.s3.S3Server`` (its endpoint and credentials are given to the server only).
        artifacts_destination: ``s3://bucket/prefix`` (the bucket must exist).
    """

    name = "mlflow server"
    stop_grace_s = 5.0  # uvicorn may wait for idle keep-alive connections; then the group is killed

    def __init__(self, directory: str | os.PathLike, s3, artifacts_destination: str, *,
                 startup_timeout: float = 90.0):  # fmt: skip
        super().__init__(directory, startup_timeout=startup_timeout)
        self.s3 = s3
        self.artifacts_destination = artifacts_destination

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MlflowServer:
        self.port = _free_port()
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow_bin) if mlflow_bin.exists() else "mlflow", "server",
               "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.directory / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts_destination]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_"))}
        env.update(self.s3.env)
        env.update(MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint, MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
        self._spawn(cmd, env, "mlflow.log")
        self._wait_until_answers(self.uri + "/health", accept=lambda err, status: status == 200)
        return self
