"""What every real server the tests start has in common: a process in its own group, bound to 127.0.0.1,
logging to a file in its folder, polled until it answers, and always stopped (the whole group)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path


class LocalServer:
    """Base of :class:`tests.s3.S3Server` and :class:`tests.mlflow_server.MlflowServer`.

    Subclasses implement ``start()`` with :meth:`_spawn` then :meth:`_wait_until_answers`.
    """

    name = "server"
    stop_grace_s = 15.0

    def __init__(self, directory: str | os.PathLike, *, startup_timeout: float):
        self.directory = Path(directory)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self._log = None

    def _spawn(self, cmd: list[str], env: dict[str, str], log_name: str) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open(self.directory / log_name, "wb")
        # Own process group: stop() signals only this server and its children.
        self.proc = subprocess.Popen(cmd, cwd=self.directory, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip

    def _wait_until_answers(self, url: str, *, accept: Callable[[Exception | None, int | None], bool]) -> None:
        """Poll ``url`` until ``accept(error, status)`` is true; stop the server and raise on timeout or exit."""
        try:
            deadline = time.monotonic() + self.startup_timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; log in {self.directory}")
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if accept(None, r.status):
                            return
                except urllib.error.HTTPError as e:
                    if accept(e, e.code):
                        return
                except OSError:
                    pass
                time.sleep(0.2)
            raise RuntimeError(f"{self.name} did not answer on {url} within {self.startup_timeout}s")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=self.stop_grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
