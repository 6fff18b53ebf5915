"""The fault corpus (issue 13): every bad input a user met gives one line, exit status 2, and changes nothing.

Table-driven: each row is (case, argv, expected message fragment); argv is formatted with ``w`` = a fresh copy
of a small world (teacher, synth images, shards, cache, probe, plan, distill run, a user's folder and file).
Every row snapshots the sha256 of every file of that tree before and after and asserts that nothing changed,
appeared or disappeared: a refused command leaves no trace. The rows that must succeed (writing into a
previous output of the same command, --overwrite of a user's folder) assert that only their --out changed.

The world is built once per module (in-process ``ppcl.cli.main``: one import of torch/diffusers for all).
The S3/MLflow timeout, credentials-in-URI and tokenizer rows live in tests/test_faults_services.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ppcl.cli import main

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------- the world


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_pipe_dir) -> Path:
    """A finished small pipeline run, built once: teacher/ synth/ shards/ cache/ probe/ plan.json run/ plus
    teacher2/ (same architecture, other weights), user/ (a user's folder) and notes.txt (a user's file)."""
    import torch
    from safetensors.torch import load_file, save_file

    w = tmp_path_factory.mktemp("world")
    shutil.copytree(tiny_pipe_dir["flux"], w / "teacher")
    steps = [
        ["synth", "--out", f"{w}/synth", "--n", "4", "--size", "32"],
        ["shard", "--source", f"{w}/synth", "--out", f"{w}/shards", "--shards", "2", "--no-progress"],
        ["encode", "--model", f"{w}/teacher", "--data", f"{w}/shards", "--out", f"{w}/cache", "--resolution", "32",
         "--batch-size", "4", "--no-progress"],
        ["probe", "--model", f"{w}/teacher", "--data", f"{w}/cache", "--out", f"{w}/probe", "--samples", "4",
         "--timesteps", "1", "--batch-size", "4", "--hsic-tokens", "16"],
        ["select", "--probe", f"{w}/probe/probe.json", "--keep-params", "0.8", "--out", f"{w}/plan.json",
         "--no-plot"],
        ["distill", "--model", f"{w}/teacher", "--plan", f"{w}/plan.json", "--data", f"{w}/cache", "--out",
         f"{w}/run", "--steps", "1", "--batch-size", "2", "--lsq-batches", "1", "--warmup-steps", "0",
         "--checkpoint-every", "1"],
    ]  # fmt: skip
    for argv in steps:
        assert main(argv) == 0, argv
    # Another teacher of the same architecture: identical files but for the transformer's weights.
    shutil.copytree(w / "teacher", w / "teacher2")
    for f in (w / "teacher2" / "transformer").glob("*.safetensors"):
        tensors = load_file(f)
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, f,
                  metadata={"format": "pt"})  # fmt: skip
    (w / "user").mkdir()
    (w / "user" / "thesis.tex").write_text("three years of work\n")
    (w / "notes.txt").write_text("my notes\n")
    (w / "bad.yaml").write_bytes(b"teacher: caf\xe9\n")
    (w / "unknown.yaml").write_text("version: 1\nteacher: /x\ntypo_key: 1\n")
    (w / "prompts.txt").write_text("a red cube\n")
    bad_src = w / "nonimages"
    bad_src.mkdir()
    (bad_src / "a.png").write_bytes(b"not an image")
    (bad_src / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "x"}) + "\n")
    empty_src = w / "emptycaptions"
    shutil.copytree(w / "synth", empty_src)
    lines = [json.loads(x) for x in (empty_src / "metadata.jsonl").read_text().splitlines()]
    key = next(k for k in lines[0] if k != "file_name")
    (empty_src / "metadata.jsonl").write_text("".join(json.dumps({**r, key: ""}) + "\n" for r in lines))
    (empty_src / ".ppcl-output.json").unlink(missing_ok=True)
    latin1 = w / "latin1"  # a source whose metadata is not UTF-8
    latin1.mkdir()
    shutil.copy(sorted((w / "synth").glob("*.png"))[0], latin1 / "a.png")
    (latin1 / "metadata.jsonl").write_bytes(b'{"file_name": "a.png", "text": "caf\xe9"}\n')
    import pyarrow as pa
    import pyarrow.parquet as pq

    cut = w / "cutparquet"  # a Parquet source cut in half (an interrupted download)
    cut.mkdir()
    image = (latin1 / "a.png").read_bytes()
    pq.write_table(pa.table({"image": [image] * 8, "caption": ["x"] * 8}), cut / "part.parquet")
    _truncate(cut / "part.parquet")
    torch.manual_seed(0)
    return w


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root`` (hidden files included)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def w(world, tmp_path) -> Path:
    """A private copy of the world for one case."""
    dst = tmp_path / "w"
    shutil.copytree(world, dst, symlinks=True)
    return dst


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    return rc, err


def _one_line(err: str) -> str:
    lines = [x[x.index("ppcl "):] for x in re.split(r"[\r\n]", err) if "ppcl " in x and ": error: " in x]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------------------- damage helpers


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _first(w: Path, folder: str, pattern: str = "shard-*.parquet") -> Path:
    return sorted((w / folder).glob(pattern))[0]


DAMAGE = {
    "truncate_shard": lambda w: _truncate(_first(w, "shards")),
    "flip_shard": lambda w: _flip(_first(w, "shards")),
    "truncate_cache": lambda w: _truncate(_first(w, "cache")),
    "flip_cache": lambda w: _flip(_first(w, "cache")),
    "truncate_text_encoder": lambda w: _truncate(sorted((w / "teacher" / "text_encoder").glob("*.safetensors"))[0]),
    "flip_plugs": lambda w: _flip(w / "run" / "plugs.safetensors"),
    "file_at_out": lambda w: (w / "x").write_text("a user's file\n"),
}

# ------------------------------------------------------------------------------------------------ the table

#: (case, damage before the run or None, argv template, expected fragment of the one-line error)
REFUSED = [
    # --- silent deletion (measured): --out is someone else's data
    ("select over the runs folder", None,
     "select --probe {w}/probe/probe.json --keep-params 0.8 --no-plot --out {w}", "holds other ppcl outputs"),
    ("select over the runs folder with --overwrite", None,
     "select --probe {w}/probe/probe.json --keep-params 0.8 --no-plot --out {w} --overwrite",
     "never replaced, even with --overwrite"),
    ("probe over the teacher", None,
     "probe --model {w}/teacher --data {w}/cache --out {w}/teacher --samples 4", "is a diffusers pipeline"),
    ("probe over the teacher with --overwrite", None,
     "probe --model {w}/teacher --data {w}/cache --out {w}/teacher --samples 4 --overwrite",
     "never replaced, even with --overwrite"),
    ("export over the cache", None,
     "export --model {w}/teacher --plan {w}/plan.json --plugs {w}/run --all --out {w}/cache --overwrite",
     "a latent cache"),
    ("export over a user's folder", None,
     "export --model {w}/teacher --plan {w}/plan.json --plugs {w}/run --all --out {w}/user",
     "pass --overwrite"),
    ("synth over the distill run", None, "synth --out {w}/run --n 2 --overwrite", "a distill run"),
    ("select over another plan's probe folder", None,
     "select --probe {w}/probe/probe.json --keep-params 0.8 --no-plot --out {w}/probe/probe.json", "pass --overwrite"),
    ("shard over the cache", None, "shard --source {w}/synth --out {w}/cache --shards 2 --no-progress",
     "a latent cache"),
    ("encode over the shards", None,
     "encode --model {w}/teacher --data {w}/shards --out {w}/shards --resolution 32 --no-progress", "a shard set"),
    ("probe over a user's file", None, "probe --model {w}/teacher --data {w}/cache --out {w}/notes.txt",
     "existing file"),
    ("report over a user's folder", None, "report --metrics {w}/notes.txt --out {w}/user", "pass --overwrite"),
    # --- --out that is an existing file (measured: distill NotADirectoryError, evaluate after 45 s)
    ("distill into a file", "file_at_out",
     "distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/x --steps 1 --warmup-steps 0",
     "existing file"),
    ("evaluate into a file", "file_at_out",
     "evaluate --model {w}/teacher --teacher {w}/teacher --prompts {w}/prompts.txt --out {w}/x --steps 1",
     "existing file"),
    ("a path under a file", None, "synth --out {w}/notes.txt/sub --n 2", "is a file, not a folder"),
    # --- distill --resume / --overwrite misuse
    ("resume a folder that is not a run", None,
     "distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/user --resume", "nothing to resume"),
    ("resume and overwrite", None,
     "distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/run --resume --overwrite",
     "pass one of them"),
    ("distill over its finished run", None,
     "distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/run --steps 1 --warmup-steps 0",
     "--resume"),
    # --- mixed or stale data (measured: accepted, exit 0)
    ("truncated shard into encode", "truncate_shard",
     "encode --model {w}/teacher --data {w}/shards --out {w}/cache2 --resolution 32 --no-progress",
     "shard-00000-of-00002.parquet"),
    ("changed shard into encode", "flip_shard",
     "encode --model {w}/teacher --data {w}/shards --out {w}/cache2 --resolution 32 --no-progress",
     "sha256 differs from the shard manifest"),
    ("truncated cache into probe", "truncate_cache",
     "probe --model {w}/teacher --data {w}/cache --out {w}/probe2 --samples 4", "shard-00000-of-00002.parquet"),
    ("truncated cache into distill", "truncate_cache",
     "distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/run2 --steps 1 --warmup-steps 0",
     "shard-00000-of-00002.parquet"),
    ("changed cache into distill", "flip_cache",
     "distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/run2 --steps 1 --warmup-steps 0",
     "sha256 differs from the cache manifest"),
    ("plugs from another teacher", None,
     "export --model {w}/teacher2 --plan {w}/plan.json --plugs {w}/run --all --out {w}/pruned",
     "trained on another teacher"),
    ("plugs changed after training", "flip_plugs",
     "export --model {w}/teacher --plan {w}/plan.json --plugs {w}/run --all --out {w}/pruned",
     "plugs.safetensors: sha256 differs"),
    ("truncated text-encoder weights", "truncate_text_encoder",
     "encode --model {w}/teacher --data {w}/shards --out {w}/cache2 --resolution 32 --no-progress",
     "truncated"),
    ("non-UTF-8 YAML config", None, "pipeline compile --config {w}/bad.yaml --out {w}/p.yaml", "not UTF-8"),
    # --- already good before issue 13: must not regress
    ("missing model", None, "probe --model {w}/nope --out {w}/probe2", "not found"),
    ("missing shard data", None, "encode --model {w}/teacher --data {w}/nope --out {w}/cache2", "not found"),
    ("missing plan", None, "select --probe {w}/nope.json --keep-params 0.5 --out {w}/p2.json", "nope.json"),
    ("bad keep-params", None,
     "select --probe {w}/probe/probe.json --keep-params 1.5 --no-plot --out {w}/p2.json", "keep"),
    ("a probe that is not a probe", None,
     "select --probe {w}/plan.json --keep-params 0.8 --no-plot --out {w}/p2.json", "plan.json"),
    ("a plan that is not a plan", None,
     "distill --model {w}/teacher --plan {w}/probe/probe.json --data {w}/cache --out {w}/run2", "probe.json"),
    ("a plan that is not a plan (export)", None,
     "export --model {w}/teacher --plan {w}/notes.txt --plugs {w}/run --all --out {w}/pruned", "notes.txt"),
    ("plugs folder that is not a run", None,
     "export --model {w}/teacher --plan {w}/plan.json --plugs {w}/user --all --out {w}/pruned", "run.json"),
    ("non-images", None, "shard --source {w}/nonimages --out {w}/s2 --shards 1 --no-progress", "no valid sample"),
    ("empty captions", None, "shard --source {w}/emptycaptions --out {w}/s2 --shards 1 --no-progress",
     "empty caption"),
    ("non-UTF-8 metadata in a source", None, "shard --source {w}/latin1 --out {w}/s2 --shards 1 --no-progress",
     "metadata.jsonl:1"),
    ("truncated Parquet source", None, "shard --source {w}/cutparquet --out {w}/s2 --shards 1 --no-progress",
     "part.parquet: not a readable Parquet file"),
    ("unknown YAML key", None, "pipeline compile --config {w}/unknown.yaml --out {w}/p.yaml", "typo_key"),
    ("unknown family", None, "tiny --arch nope --out {w}/t2", "unknown family"),
]


@pytest.mark.parametrize("case,damage,argv,fragment", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_in_one_line_and_nothing_changes(w, capsys, case, damage, argv, fragment):
    if damage:
        DAMAGE[damage](w)
    before = snapshot(w)
    rc, err = run_cli(argv.format(w=w).split(), capsys)
    line = _one_line(err)
    assert rc == 2, err
    assert fragment in line, line
    assert snapshot(w) == before, f"{case}: the tree changed"
    assert not list(w.parent.glob(".*ppcl-replaced*")) and not list(w.glob(".*tmp-*"))


# ----------------------------------------------------------------------------------- rows that must succeed

#: (case, argv, folder or file under w that may change; everything else must stay byte-identical)
ALLOWED = [
    ("select over its own plan", "select --probe {w}/probe/probe.json --keep-params 0.7 --no-plot --out {w}/plan.json",
     "plan.json"),
    ("synth over its own output", "synth --out {w}/synth --n 3 --size 32", "synth"),
    ("synth replaces a user's folder with --overwrite", "synth --out {w}/user --n 2 --size 32 --overwrite", "user"),
    ("select replaces a user's file with --overwrite",
     "select --probe {w}/probe/probe.json --keep-params 0.8 --no-plot --out {w}/notes.txt --overwrite", "notes.txt"),
    ("shard re-run on its own output", "shard --source {w}/synth --out {w}/shards --shards 2 --no-progress", "shards"),
]  # fmt: skip


@pytest.mark.parametrize("case,argv,allowed", ALLOWED, ids=[r[0] for r in ALLOWED])
def test_writes_only_its_out(w, capsys, case, argv, allowed):
    before = snapshot(w)
    rc, err = run_cli(argv.format(w=w).split(), capsys)
    assert rc == 0, err
    after = snapshot(w)
    inside = lambda rel: rel == allowed or rel.startswith(allowed + "/")  # noqa: E731
    assert {k: v for k, v in before.items() if not inside(k)} == {k: v for k, v in after.items() if not inside(k)}
    if (w / allowed).is_dir():
        assert json.loads((w / allowed / ".ppcl-output.json").read_text())["command"] == argv.split()[0]
    assert not list(w.glob(".*ppcl-replaced*"))


def test_failed_overwrite_puts_the_old_output_back(w, capsys):
    before = snapshot(w)
    # --samples 0 is refused by probe after the old folder was moved aside: it must come back.
    rc, err = run_cli(f"probe --model {w}/teacher --data {w}/cache --out {w}/user --samples 0 --overwrite".split(),
                      capsys)  # fmt: skip
    assert rc == 2 and _one_line(err)
    assert snapshot(w) == before
    assert not list(w.glob(".*ppcl-replaced*"))


# ------------------------------------------------------------------------------ environment and concurrency


class _ReadOnly:
    """A read-only mount, simulated: tests run as root here, and root ignores permission bits."""

    def __init__(self, folder: Path, monkeypatch):
        self.folder = str(folder)
        for name in ("open", "mkdir", "replace", "rename"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self._wrap(real))

    def _wrap(self, real):
        def fake(path, *a, **kw):
            if str(os.path.abspath(os.fspath(path))).startswith(self.folder) and (
                real is not os.open or (a and a[0] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            ):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real(path, *a, **kw)

        return fake


@pytest.mark.parametrize("argv", [
    "synth --out {w}/ro/x --n 2",
    "select --probe {w}/probe/probe.json --keep-params 0.8 --no-plot --out {w}/ro/plan.json",
    "probe --model {w}/teacher --data {w}/cache --out {w}/ro/p --samples 4",
    "export --model {w}/teacher --plan {w}/plan.json --plugs {w}/run --all --out {w}/ro/pruned",
])  # fmt: skip
def test_read_only_out(w, capsys, monkeypatch, argv):
    (w / "ro").mkdir()
    before = snapshot(w)
    _ReadOnly(w / "ro", monkeypatch)
    rc, err = run_cli(argv.format(w=w).split(), capsys)
    assert rc == 2 and "Read-only file system" in _one_line(err) and str(w / "ro") in err
    monkeypatch.undo()
    assert snapshot(w) == before


def test_environment_oserror_mid_run_is_one_line_and_bugs_keep_their_traceback(w, capsys, monkeypatch):
    import ppcl.outputs

    monkeypatch.setattr(ppcl.outputs, "check_writable", lambda out: None)  # fail later, inside the writer
    (w / "ro").mkdir()
    _ReadOnly(w / "ro", monkeypatch)
    rc, err = run_cli(f"synth --out {w}/ro/x --n 2".split(), capsys)
    assert rc == 2 and "Read-only file system" in _one_line(err)
    monkeypatch.undo()
    import ppcl.cli.synth

    def bug(*a, **kw):
        raise OSError(errno.EBADF, "Bad file descriptor")  # not the user's environment: a bug

    monkeypatch.setattr(ppcl.cli.synth, "run", bug)
    with pytest.raises(OSError):
        main(["synth", "--out", str(w / "y"), "--n", "2"])


def test_second_writer_is_refused_at_once(w, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ppcl.outputs import lock\n"
         "with lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)", str(w / "run2")],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(w)
        t0 = time.perf_counter()
        rc, err = run_cli(f"distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/run2 "
                          "--steps 1 --warmup-steps 0".split(), capsys)  # fmt: skip
        assert rc == 2 and f"being written by another process (pid {holder.pid})" in _one_line(err)
        assert time.perf_counter() - t0 < 5
        # the stage function itself (what a component calls) takes the same lock
        from ppcl.distill import distill
        from ppcl.errors import PPCLError

        with pytest.raises(PPCLError, match="being written by another process"):
            distill(str(w / "teacher"), str(w / "plan.json"), w / "run2", data=str(w / "cache"), steps=1,
                    warmup_steps=0, progress=False)  # fmt: skip
        assert snapshot(w) == before
    finally:
        holder.kill()
        holder.wait()


def test_killed_reshard_leaves_the_previous_dataset(w, capsys, monkeypatch):
    """A re-shard from another source dies after writing one new shard: the old manifest and every shard it
    lists are untouched, encode still accepts them, and a finished re-shard then replaces the generation."""
    import ppcl.data.shard as shard_mod
    from ppcl.data.shard import read_shard_manifest

    before = snapshot(w)
    other = w.parent / "other"
    shutil.copytree(w / "synth", other)
    images = sorted(other.glob("*.png"))
    for p in images[1:]:  # another source: every image replaced by the first one
        p.write_bytes(images[0].read_bytes())
    real, calls = shard_mod._write_parquet, []

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-way through pass 2
        return real(*a, **kw)

    monkeypatch.setattr(shard_mod, "_write_parquet", dies)
    rc, err = run_cli(f"shard --source {other} --out {w}/shards --shards 2 --no-progress".split(), capsys)
    assert rc == 130
    assert snapshot(w) == before  # old generation intact, the new shard removed again
    read_shard_manifest(str(w / "shards"))  # verifies every checksum
    monkeypatch.undo()
    rc, err = run_cli(f"shard --source {other} --out {w}/shards --shards 2 --no-progress".split(), capsys)
    assert rc == 0, err
    m = read_shard_manifest(str(w / "shards"))
    assert sorted(p.name for p in (w / "shards").glob("shard-*")) == sorted(s.name for s in m.shards)


def test_resume_of_a_killed_run_without_marker(w, capsys):
    """kill -9 leaves checkpoints/ but no marker, run.json or plugs: --resume still recognises its own run."""
    for name in (".ppcl-output.json", "run.json", "plugs.safetensors"):
        (w / "run" / name).unlink()
    before = snapshot(w)
    rc, err = run_cli(f"distill --model {w}/teacher --plan {w}/plan.json --data {w}/cache --out {w}/run --steps 1 "
                      "--warmup-steps 0 --resume".split(), capsys)  # fmt: skip
    assert rc == 0, err
    after = snapshot(w)
    assert {k: v for k, v in before.items() if not k.startswith("run/")} == {
        k: v for k, v in after.items() if not k.startswith("run/")}
    assert {"run/run.json", "run/plugs.safetensors", "run/.ppcl-output.json"} <= after.keys()
