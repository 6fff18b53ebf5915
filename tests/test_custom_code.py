"""Width-pruned exports load like any diffusers custom component (issue 17 item 3): with
``trust_remote_code=True`` in a process where ppcl cannot be imported, generating what ppcl generates; with the
stock class, an error in both of diffusers' loading modes, never a model with random FFNs."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppcl.arch import get_adapter, load_pipeline
from ppcl.custom_code import module_name, width_class_name, write_custom_code
from ppcl.width_runtime import REMOVED_WEIGHTS_FILE

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
#: one ffn_linear and one text_freeze per family (indices of the tiny 10-block models)
WIDTH_OPS = {
    "flux": [{"op": "ffn_linear", "block": 3, "stream": "text"}, {"op": "text_freeze", "interval": [0, 2]}],
    "sd3": [{"op": "ffn_linear", "block": 4, "stream": "image"}, {"op": "text_freeze", "interval": [1, 3]}],
    "qwenimage": [{"op": "ffn_linear", "block": 3, "stream": "image"}, {"op": "text_freeze", "interval": [5, 7]}],
}
PROMPT = "a red circle above a blue square"

# Runs in a fresh interpreter (-I: no PYTHONPATH, no script or working folder on sys.path) where every import of
# ppcl fails (it is installed editable in the venv, so leaving it off sys.path is not enough).
CHILD = r"""
import importlib.abc, sys

class NoPPCL(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ppcl" or name.startswith("ppcl."):
            raise ImportError("ppcl is not installed here")
        return None

sys.meta_path.insert(0, NoPPCL())
# the checkout off sys.path, but not the venv's site-packages, which may live inside it (.venv)
sys.path = [p for p in sys.path if not p.startswith(sys.argv[1]) or p.startswith(sys.prefix)]
try:
    import ppcl  # noqa: F401
    raise SystemExit("ppcl is importable")
except ImportError:
    pass
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

torch.set_num_threads(1)
out = {}
for i, folder in enumerate(sys.argv[3:]):
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe.transformer).__name__.startswith("PPCL"), type(pipe.transformer)
    g = torch.Generator().manual_seed(0)
    out[str(i)] = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=g,
                       output_type="latent").images.contiguous()
assert not [m for m in sys.modules if m == "ppcl" or m.startswith("ppcl.")]
save_file(out, sys.argv[2])
print("ok")
""".replace("PROMPT", repr(PROMPT))


def _latents(pipe) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=g, output_type="latent").images


def _width_export(teacher: Path, ops: list[dict], out: Path) -> Path:
    """A width-pruned pipeline folder of ``family`` written as ``ppcl export`` writes one (its transformer: ppcl's
    width class with seeded random weights, every projection non-zero so a lost one shows)."""
    pipe = load_pipeline(teacher)
    adapter = get_adapter(pipe)
    cls = getattr(importlib.import_module(type(adapter).__module__), width_class_name(type(adapter)))
    cfg = {k: v for k, v in adapter.transformer.config.items() if not k.startswith("_")}
    model = cls(**cfg, width_ops=ops).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    shutil.copytree(teacher, out, ignore=shutil.ignore_patterns("transformer"))
    model.save_pretrained(out / "transformer")
    index = json.loads((out / "model_index.json").read_text())
    index["transformer"] = write_custom_code(type(adapter), model, out / "transformer")
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


@pytest.fixture(scope="module")
def exports(tiny_pipe_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("width_exports")
    return {f: _width_export(tiny_pipe_dir[f], ops, root / f) for f, ops in WIDTH_OPS.items()}


@pytest.fixture(scope="module")
def ffn_exports(tiny_pipe_dir, tmp_path_factory):
    """Exports whose only width op is ffn_linear: every stock weight keeps its shape, only the FFN is gone (the
    case that used to load with the stock class behind warnings)."""
    root = tmp_path_factory.mktemp("ffn_exports")
    return {f: _width_export(tiny_pipe_dir[f], ops[:1], root / f) for f, ops in WIDTH_OPS.items()}


def test_loads_with_trust_remote_code_without_ppcl_and_generates_the_same(exports, tmp_path):
    ours = {}
    for family, folder in exports.items():
        entry = json.loads((folder / "model_index.json").read_text())["transformer"]
        assert entry == [module_name(family), entry[1]] and (folder / "transformer" / f"{entry[0]}.py").is_file()
        source = (folder / "transformer" / f"{entry[0]}.py").read_text()
        assert "ppcl" not in {line.split()[1].split(".")[0] for line in source.splitlines()
                              if line.startswith(("import ", "from "))}
        pipe = load_pipeline(folder)  # ppcl's own class, the folder's code not run
        assert type(pipe.transformer).__module__.startswith("ppcl.arch.")
        ours[family] = _latents(pipe)
    result = tmp_path / "latents.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_HOME"] = str(tmp_path / "hf")  # diffusers copies the custom module under HF_HOME/modules
    r = subprocess.run([sys.executable, "-I", "-c", CHILD, str(ROOT), str(result), *map(str, exports.values())],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    from safetensors.torch import load_file

    theirs = load_file(result)
    for i, family in enumerate(exports):
        assert torch.equal(theirs[str(i)], ours[family]), family


def test_stock_class_refuses_a_width_export(exports, ffn_exports):
    """Both loading modes: diffusers' size-mismatch error (on the empty stand-in of a removed FFN weight where
    nothing else differs in shape), not a warning."""
    import diffusers

    for family in WIDTH_OPS:
        adapter_cls = type(get_adapter(load_pipeline(exports[family])))
        stock = getattr(diffusers, adapter_cls.transformer_class.__name__)
        ffn = adapter_cls.width_code["ffn"][WIDTH_OPS[family][0]["stream"]]
        for low_cpu_mem_usage in (True, False):
            with pytest.raises((ValueError, RuntimeError), match=rf"{ffn}\.\S*(weight|bias).*torch\.Size\(\[0\]\)"):
                stock.from_pretrained(ffn_exports[family] / "transformer", low_cpu_mem_usage=low_cpu_mem_usage)
            with pytest.raises((ValueError, RuntimeError), match="shape"):
                stock.from_pretrained(exports[family] / "transformer", low_cpu_mem_usage=low_cpu_mem_usage)
        # the pipeline without trust_remote_code: diffusers' own refusal to run the folder's code
        with pytest.raises(ValueError, match="trust_remote_code=True"):
            diffusers.DiffusionPipeline.from_pretrained(exports[family])


def test_removed_weight_stand_ins_are_empty_and_only_removed_weights(exports):
    """The stand-ins hold no data and name exactly the stock weights the width ops removed; ppcl's class loads
    the folder with no missing and no unexpected weight."""
    from safetensors import safe_open

    folder = exports["flux"] / "transformer"
    with safe_open(folder / REMOVED_WEIGHTS_FILE, "pt") as f:
        removed = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.numel() == 0 for t in removed.values())
    # ffn_linear on block 3's text FFN; text_freeze [0, 2] drops blocks 1 and 2's text FFN and text attention output
    ffn = ["ff_context.net.0.proj", "ff_context.net.2"]
    expected = {f"transformer_blocks.{b}.{m}" for b in (1, 2, 3) for m in ffn}
    expected |= {f"transformer_blocks.{b}.attn.to_add_out" for b in (1, 2)}
    assert {k.rsplit(".", 1)[0] for k in removed} == expected
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert {k for k, v in index["weight_map"].items() if v == REMOVED_WEIGHTS_FILE} == set(removed)
    from ppcl.arch.flux import PPCLFluxTransformer2DModel

    _, info = PPCLFluxTransformer2DModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == [] and info["mismatched_keys"] == []


def test_ppcl_readers_resolve_the_custom_code_entry(exports):
    """ppcl's own readers of model_index.json take the custom-code entry as ppcl's class (no folder code run)."""
    from ppcl.errors import PPCLError
    from ppcl.plan import meta_adapter
    from ppcl.stages import check_family

    for family, folder in exports.items():
        check_family(str(folder), family)
        assert meta_adapter(folder).family == family
        other = next(f for f in WIDTH_OPS if f != family)
        with pytest.raises(PPCLError, match=f"family '{other}' does not match"):
            check_family(str(folder), other)
