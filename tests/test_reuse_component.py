"""README's "Reuse a component" example, run as written: a reused ppcl component compiled with configure_task
carries the cluster settings (runtime image, S3 Secret and ConfigMap env, GPU request and pool) in its YAML."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

README = Path(__file__).resolve().parents[1] / "README.md"


def _reuse_example() -> str:
    section = README.read_text().split("## Reuse a component", 1)[1]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_reuse_example_compiles_with_secret_env_and_gpu_request(tmp_path, monkeypatch):
    from ppcl import cluster

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-compile-me-1234")
    exec(compile(_reuse_example(), "README.md (Reuse a component)", "exec"), {"__name__": "readme_reuse"})
    docs = list(yaml.safe_load_all((tmp_path / "score.yaml").read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (executor,) = [e for name, e in spec["deploymentSpec"]["executors"].items() if "evaluate" in name]
    container = executor["container"]
    assert container["image"] == "ghcr.io/me/ppcl:0.1.0"
    res = container["resources"]
    assert res["accelerator"]["resourceType"] == "nvidia.com/gpu" and int(res["accelerator"]["resourceCount"]) == 1
    assert container["resources"]["cpuRequest"] and container["resources"]["memoryRequest"]
    assert {"name": "MLFLOW_EXPERIMENT_NAME", "value": "ppcl"} in container["env"]
    (k8s,) = [e for name, e in platform.items() if "evaluate" in name]
    secret = k8s["secretAsEnv"][0]
    assert secret["secretName"] == cluster.S3_SECRET.name
    assert {kv["envVar"] for kv in secret["keyToEnv"]} == set(cluster.S3_SECRET.keys)
    assert k8s["configMapAsEnv"][0]["configMapName"] == cluster.CONFIG_MAP.name
    assert k8s["nodeSelector"]["labels"] == cluster.GPU_POOL.node_selector
    assert k8s["tolerations"]
    text = (tmp_path / "score.yaml").read_text()
    assert "AWS_SECRET_ACCESS_KEY" in text and "do-not-compile-me-1234" not in text  # the name, never the value


def test_reuse_component_files_ship_in_the_package():
    """ppcl_kfp.components is the checkout's components/ (a link): an install carries every stage's files."""
    import ppcl_kfp.components
    from ppcl.config import STAGES
    from ppcl_kfp.tasks import component_yaml

    root = Path(ppcl_kfp.components.__file__).parent
    assert root.resolve() == (README.parent / "components").resolve()
    for stage in STAGES:
        assert component_yaml(stage).is_file() and (root / stage / "component.py").is_file()
    import tomllib

    data = tomllib.loads((README.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*/component.yaml" in data["ppcl_kfp.components"]
