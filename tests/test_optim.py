"""8-bit AdamW is never a silent fallback: refused on CUDA without bitsandbytes, plain AdamW on CPU, and run.json
records the optimiser that actually ran."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from ppcl.distill import DistillSettings, distill
from ppcl.distill.optim import make_optimizer, optimizer_name, uses_8bit_adam
from ppcl.errors import PPCLError
from ppcl.plan import make_plan, save_plan

torch.set_num_threads(1)


@pytest.fixture
def no_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` raises ImportError


@pytest.fixture
def fake_bitsandbytes(monkeypatch):
    """A stand-in for the package (CUDA-only, not installable here): AdamW8bit as a torch AdamW from its module."""
    bnb = types.ModuleType("bitsandbytes")
    bnb.__version__ = "0.45.1"
    bnb.optim = types.SimpleNamespace(AdamW8bit=type("AdamW8bit", (torch.optim.AdamW,),
                                                     {"__module__": "bitsandbytes.optim.adamw"}))
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)


def test_8bit_on_cuda_without_bitsandbytes_is_one_line_naming_setting_and_fix(no_bitsandbytes):
    params = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(PPCLError) as e:
        make_optimizer(params, DistillSettings(use_8bit_adam=True), torch.device("cuda"))
    msg = str(e.value)
    assert "\n" not in msg and "use_8bit_adam" in msg and "ppcl[cuda]" in msg and "use_8bit_adam false" in msg
    # asked for fp32 AdamW, CUDA needs nothing more
    opt = make_optimizer(params, DistillSettings(use_8bit_adam=False), torch.device("cuda"))
    assert optimizer_name(opt) == "AdamW"


def test_8bit_on_cuda_with_bitsandbytes_runs_it_and_names_its_version(fake_bitsandbytes):
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(4))], DistillSettings(use_8bit_adam=True),
                         torch.device("cuda"))
    assert optimizer_name(opt) == "AdamW8bit (bitsandbytes 0.45.1)"
    # off by default (it cannot step FSDP2's shards): the default is fp32 AdamW even with bitsandbytes installed
    assert optimizer_name(make_optimizer([torch.nn.Parameter(torch.zeros(4))], DistillSettings(),
                                         torch.device("cuda"))) == "AdamW"


def test_cpu_runs_plain_adamw_whatever_is_installed(fake_bitsandbytes):
    assert not uses_8bit_adam(DistillSettings(use_8bit_adam=True), "cpu")
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(4))], DistillSettings(use_8bit_adam=True),
                         torch.device("cpu"))
    assert type(opt) is torch.optim.AdamW and optimizer_name(opt) == "AdamW"


def test_cpu_run_asking_for_8bit_records_adamw_in_run_json(tiny_pipe_dir, tmp_path, no_bitsandbytes):
    from ppcl.arch import get_adapter, load_pipeline

    pipe_dir = tiny_pipe_dir["flux"]
    plan = tmp_path / "plan.json"
    save_plan(make_plan(get_adapter(load_pipeline(pipe_dir)), [[1, 2]], allow_ends=True), plan)
    distill(str(pipe_dir), plan, tmp_path / "run", steps=2, warmup_steps=1, n_samples=2, batch_size=1,
            progress=False, use_8bit_adam=True)
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["settings"]["use_8bit_adam"] is True  # asked for ...
    assert meta["optimizer"] == "AdamW"  # ... and what ran on CPU
