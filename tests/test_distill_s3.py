"""``ppcl distill`` with s3:// model, plan, data and out against a real S3 server (SeaweedFS): checkpoints mirrored
with a completion marker, a run stopped mid-way resumed from S3 alone ends bit-identical to an uninterrupted local
run."""

from __future__ import annotations

import json

import pytest
import torch

from ppcl import storage
from ppcl.cli import main

torch.set_num_threads(1)

ARGS = ["--steps", "7", "--checkpoint-every", "2", "--lr", "2e-3", "--warmup-steps", "2", "--batch-size", "2",
        "--lsq-batches", "2"]  # fmt: skip


@pytest.fixture
def s3(s3_server, monkeypatch):
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    storage._CLIENTS.clear()
    return s3_server


@pytest.fixture(scope="module")
def inputs(tiny_pipe_dir, tmp_path_factory):
    """A tiny FLUX teacher, a plan (one interval + one width op) and a latent cache, all local."""
    from ppcl.arch import get_adapter, load_pipeline
    from ppcl.data.encode import encode_shards
    from ppcl.data.shard import shard_source
    from ppcl.data.synth import write_synth
    from ppcl.plan import make_plan, save_plan

    root = tmp_path_factory.mktemp("distill_s3")
    pipe_dir = tiny_pipe_dir["flux"]
    write_synth(root / "src", 8, size=32)
    shard_source(str(root / "src"), str(root / "shards"), 2, progress=False)
    encode_shards(str(pipe_dir), str(root / "shards"), str(root / "cache"), resolution=32, batch_size=4,
                  progress=False)  # fmt: skip
    plan = make_plan(get_adapter(load_pipeline(pipe_dir)), [[1, 2]],
                     width=[{"op": "ffn_linear", "block": 3, "stream": "image"}], allow_ends=True)  # fmt: skip
    save_plan(plan, root / "plan.json")
    return {"model": pipe_dir, "plan": root / "plan.json", "cache": root / "cache"}


def test_stopped_s3_run_resumed_from_s3_is_bit_identical(s3, inputs, tmp_path, capsys):
    bucket = s3.make_bucket("distill-s3")
    model, plan, data = f"{bucket}/teacher", f"{bucket}/in/plan.json", f"{bucket}/in/cache"
    storage.upload_dir(inputs["model"], model)
    storage.upload_file(inputs["plan"], plan)
    storage.upload_dir(inputs["cache"], data)
    out = f"{bucket}/runs/a"

    local = ["distill", "--model", str(inputs["model"]), "--plan", str(inputs["plan"]), "--data", str(inputs["cache"])]
    assert main([*local, "--out", str(tmp_path / "full"), *ARGS]) == 0
    remote = ["distill", "--model", model, "--plan", plan, "--data", data, "--out", out, *ARGS]

    # First attempt: --resume with nothing on S3 starts from scratch; "killed" after step 5.
    assert main([*remote, "--resume", "--stop-after", "5", "--scratch", str(tmp_path / "node-a")]) == 0
    from ppcl.distill_s3 import complete_checkpoints, remote_checkpoints

    assert complete_checkpoints(out) == ["step-000002", "step-000004"]
    assert not storage.exists(f"{out}/run.json") and not storage.exists(f"{out}/plugs.safetensors")
    ck = remote_checkpoints(out)["step-000004"]
    # the sharded checkpoint of the one process (DCP's hidden .metadata under a listable name), its curve, the marker
    assert sorted(u.rsplit("/", 1)[1] for u in ck) == ["__0_0.distcp", "dcp.metadata", "metrics.jsonl", "rng-0.pt",
                                                      "state.json"]  # fmt: skip
    # A checkpoint whose upload died before its marker: never resumed from.
    storage.write_bytes(f"{out}/checkpoints/step-000006/plugs.safetensors", b"half an upload")
    assert complete_checkpoints(out) == ["step-000002", "step-000004"]

    # An occupied output without --resume is refused, nothing touched.
    capsys.readouterr()
    assert main([*remote, "--scratch", str(tmp_path / "node-x")]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1

    # The retry runs on another machine: an empty scratch, everything comes from S3.
    assert main([*remote, "--resume", "--scratch", str(tmp_path / "node-b")]) == 0
    assert storage.read_bytes(f"{out}/plugs.safetensors") == (tmp_path / "full" / "plugs.safetensors").read_bytes()
    steps = [json.loads(l)["step"] for l in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert steps == list(range(1, 8))
    meta = json.loads(storage.read_bytes(f"{out}/run.json"))
    assert meta["teacher"]["model"] == model and meta["data"] == data and meta["steps"] == 7
    assert complete_checkpoints(out) == ["step-000006", "step-000007"]  # keep 2; the half upload was replaced

    # A node restarted after the job finished: nothing to do, success.
    capsys.readouterr()
    assert main([*remote, "--resume", "--scratch", str(tmp_path / "node-c")]) == 0
    assert "already complete" in capsys.readouterr().err


def test_missing_s3_inputs_fail_in_one_line(s3, inputs, tmp_path, capsys):
    bucket = s3.make_bucket("distill-s3")
    argv = ["distill", "--model", f"{bucket}/no-teacher", "--plan", str(inputs["plan"]), "--out", f"{bucket}/runs/b",
            "--scratch", str(tmp_path / "s")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--model s3://distill-s3/no-teacher: nothing under this S3 URI" in err and len(err.strip().splitlines()) == 1
    assert main([*argv[:-4], "--out", "s3://no-such-bucket/x", "--scratch", str(tmp_path / "s")]) == 2
    assert "no-such-bucket" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_cache_encoded_to_s3_carries_the_negative_prompt_to_distill(s3, inputs, tmp_path):
    """``ppcl encode --out s3://...`` uploads uncond.safetensors with its sha256, reads back as the local cache's,
    and a distillation from that S3 cache with ``--uncond-ratio`` trains on it (the scratch copy holds it)."""
    from ppcl.data.cache import read_uncond
    from ppcl.data.encode import encode_shards

    bucket = s3.make_bucket("encode-s3")
    encode_shards(str(inputs["model"]), str(inputs["cache"].parent / "shards"), f"{bucket}/cache", resolution=32,
                  batch_size=4, progress=False)  # fmt: skip
    assert storage.head(f"{bucket}/cache/uncond.safetensors")["metadata"]["sha256"]
    local_prompt, local = read_uncond(inputs["cache"])
    prompt, remote = read_uncond(f"{bucket}/cache")
    assert prompt == local_prompt and set(remote) == set(local)
    assert all(torch.equal(remote[k], local[k]) for k in local)
    argv = ["distill", "--model", str(inputs["model"]), "--plan", str(inputs["plan"]), "--data", f"{bucket}/cache",
            "--out", str(tmp_path / "run"), "--scratch", str(tmp_path / "s"), *ARGS, "--uncond-ratio", "0.5"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "run" / "run.json").read_text())["settings"]["uncond_ratio"] == 0.5
