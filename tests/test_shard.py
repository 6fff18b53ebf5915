"""`ppcl shard`: determinism, counts, rejects, formats, S3 in and out, bad input; benchmarks (slow)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ppcl.cli import main
from ppcl.data.shard import read_shard_manifest, shard_of

ROOT = Path(__file__).resolve().parents[1]


def png(seed: int, size: int = 64, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def make_imagefolder(root: Path, n: int, *, corrupt=(), empty=(), small=(), column="text") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i in range(n):
            name = f"img_{i:04d}.png"
            data = b"not an image" if i in corrupt else png(i, 16 if i in small else 64)
            (root / name).write_bytes(data)
            f.write(json.dumps({"file_name": name, column: "" if i in empty else f"a photo number {i}"}) + "\n")
    return root


def shard(*args: str) -> int:
    return main(["shard", "--no-progress", *args])


def shard_hashes(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("shard-*.parquet"))}


def test_deterministic_counts_and_rejects(tmp_path):
    src = make_imagefolder(tmp_path / "src", 40, corrupt={5}, empty={7}, small={9})
    assert shard("--source", str(src), "--out", str(tmp_path / "a"), "--shards", "3", "--min-size", "32") == 0
    assert shard("--source", str(src), "--out", str(tmp_path / "b"), "--shards", "3", "--min-size", "32") == 0
    a, b = shard_hashes(tmp_path / "a"), shard_hashes(tmp_path / "b")
    assert len(a) == 3 and a == b
    assert (tmp_path / "a/manifest.json").read_bytes() == (tmp_path / "b/manifest.json").read_bytes()

    m = read_shard_manifest(str(tmp_path / "a"))
    assert m.version == 1 and m.read == 40
    assert m.accepted == 37 == sum(s.samples for s in m.shards)
    assert m.read == m.accepted + len(m.rejected)
    reasons = {r.key: r.reason for r in m.rejected}
    assert reasons["img_0005.png"].startswith("undecodable image")
    assert reasons["img_0007.png"] == "empty caption"
    assert "below the minimum size 32" in reasons["img_0009.png"]
    for s in m.shards:
        assert hashlib.sha256((tmp_path / "a" / s.name).read_bytes()).hexdigest() == s.sha256
        assert (tmp_path / "a" / s.name).stat().st_size == s.bytes


def test_shard_content_schema_and_passthrough(tmp_path):
    src = make_imagefolder(tmp_path / "src", 20)
    assert shard("--source", str(src), "--out", str(tmp_path / "out"), "--shards", "4") == 0
    seen = []
    for i, p in enumerate(sorted((tmp_path / "out").glob("shard-*.parquet"))):
        t = pq.read_table(p)
        assert t.schema.names == ["key", "caption", "image", "width", "height", "source"]
        assert t.schema.field("image").type == pa.binary() and t.schema.field("width").type == pa.int32()
        keys = t.column("key").to_pylist()
        assert keys == sorted(keys)
        assert all(shard_of(k, 4) == i for k in keys)  # hash-of-key placement
        for row in t.to_pylist():
            assert row["image"] == (src / row["key"]).read_bytes()  # bytes passed through, not re-encoded
            assert (row["width"], row["height"]) == (64, 64)
            assert row["caption"] == f"a photo number {int(row['key'][4:8])}"
        seen += keys
    assert sorted(seen) == [f"img_{i:04d}.png" for i in range(20)]


def test_rerun_skips_unchanged_and_rewrites_changed(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src", 20)
    out = tmp_path / "out"
    assert shard("--source", str(src), "--out", str(out), "--shards", "2") == 0
    before = shard_hashes(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    capsys.readouterr()
    assert shard("--source", str(src), "--out", str(out), "--shards", "2") == 0
    assert "(0 written, 2 unchanged)" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes
    # A damaged shard no longer matches its checksum: it is rewritten, the other is kept.
    damaged = sorted(out.glob("shard-*"))[0]
    damaged.write_bytes(b"junk")
    assert shard("--source", str(src), "--out", str(out), "--shards", "2") == 0
    assert "(1 written, 1 unchanged)" in capsys.readouterr().out
    assert shard_hashes(out) == before


def test_parquet_source_with_named_columns(tmp_path):
    src = tmp_path / "pq"
    src.mkdir()
    rows = {"id": [f"s{i}" for i in range(12)], "prompt": [f"cap {i}" for i in range(12)],
            "jpg": [png(i, fmt="JPEG") for i in range(12)]}  # fmt: skip
    rows["jpg"][3] = png(3, fmt="JPEG")[:200]  # truncated JPEG: passes verify(), fails decode
    pq.write_table(pa.table(rows), src / "part-0.parquet")
    out = tmp_path / "out"
    code = shard("--source", str(src), "--out", str(out), "--shards", "2", "--caption-column", "prompt",
                 "--image-column", "jpg", "--key-column", "id")  # fmt: skip
    assert code == 0
    m = read_shard_manifest(str(out))
    assert m.format == "parquet" and m.accepted == 11
    assert [(r.key, r.reason.split(" (")[0]) for r in m.rejected] == [("s3", "undecodable image")]
    keys = sorted(k for p in out.glob("shard-*") for k in pq.read_table(p).column("key").to_pylist())
    assert keys == sorted(f"s{i}" for i in range(12) if i != 3)


def test_missing_caption_column_is_one_line_error(tmp_path, capsys):
    src = tmp_path / "pq"
    src.mkdir()
    pq.write_table(pa.table({"image": [png(0)], "caption": ["x"]}), src / "a.parquet")
    out = tmp_path / "out"
    assert shard("--source", str(src), "--out", str(out), "--shards", "2", "--caption-column", "text") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no caption column 'text'" in err and "a.parquet" in err
    assert not out.exists()


def make_tar(path: Path, n: int, *, bad_json: int | None = None) -> Path:
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            members = {f"sample{i:03d}.png": png(i), f"sample{i:03d}.json": json.dumps({"caption": f"tar {i}"}).encode()}
            if i == bad_json:
                members[f"sample{i:03d}.json"] = b"{}"
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_webdataset_source(tmp_path):
    src = tmp_path / "wds"
    src.mkdir()
    make_tar(src / "train-000.tar", 6, bad_json=2)
    make_tar(src / "train-001.tar", 5)
    out = tmp_path / "out"
    assert shard("--source", str(src), "--out", str(out), "--shards", "3") == 0
    m = read_shard_manifest(str(out))
    assert m.format == "webdataset" and m.read == 11 and m.accepted == 10
    assert m.rejected[0].key == "train-000/sample002" and m.rejected[0].reason == "missing caption"
    t = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("shard-*"))])
    assert "train-001/sample004" in t.column("key").to_pylist()


def test_unreadable_tar_member_and_empty_source(tmp_path, capsys):
    src = tmp_path / "wds"
    src.mkdir()
    good = make_tar(tmp_path / "good.tar", 4).read_bytes()
    (src / "broken.tar").write_bytes(good[: 512 * 3 + 100])  # cut inside the second member's data
    out = tmp_path / "out"
    assert shard("--source", str(src), "--out", str(out), "--shards", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "broken.tar" in err and "unreadable tar member" in err
    assert not out.exists()

    (tmp_path / "empty").mkdir()
    assert shard("--source", str(tmp_path / "empty"), "--out", str(out), "--shards", "2") == 2
    assert "is empty" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def s3env(s3_server, monkeypatch):
    monkeypatch.delenv("PPCL_S3_ENDPOINT", raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PPCL_S3_MAX_ATTEMPTS", "2")
    return s3_server


def test_s3_source_and_output_match_local(s3env, tmp_path):
    from ppcl import storage

    src = make_imagefolder(tmp_path / "src", 16, empty={2})
    bucket = s3env.make_bucket("sharding")
    storage.upload_dir(src, f"{bucket}/raw")
    assert shard("--source", str(src), "--out", str(tmp_path / "local"), "--shards", "2") == 0
    assert shard("--source", f"{bucket}/raw", "--out", f"{bucket}/shards", "--shards", "2") == 0
    m = read_shard_manifest(f"{bucket}/shards")
    assert m.accepted == 15 and m.rejected[0].reason == "empty caption"
    local = shard_hashes(tmp_path / "local")
    assert {s.name: s.sha256 for s in m.shards} == local
    for s in m.shards:
        assert hashlib.sha256(storage.read_bytes(f"{bucket}/shards/{s.name}")).hexdigest() == s.sha256


def test_s3_wrong_credentials_and_missing_bucket(s3env, tmp_path, monkeypatch, capsys):
    src = make_imagefolder(tmp_path / "src", 4)
    s3env.make_bucket("guarded")
    assert shard("--source", str(src), "--out", "s3://nosuchbucket/shards", "--shards", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bucket 'nosuchbucket' does not exist" in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-value")
    assert shard("--source", str(src), "--out", "s3://guarded/shards", "--shards", "2") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "s3://guarded/shards" in err and "access denied" in err
    assert "wrong-secret-value" not in err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3env.env["AWS_SECRET_ACCESS_KEY"])
    assert s3env.client().list_objects_v2(Bucket="guarded").get("KeyCount", 0) == 0  # nothing partial


# ------------------------------------------------------------------------------------------- benchmarks
_BENCH = r"""
import io, json, os, sys, time, resource
import numpy as np
from PIL import Image
root, n, shards = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
src = os.path.join(root, "src")
if not os.path.exists(os.path.join(src, "metadata.jsonl")):
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with open(os.path.join(src, "metadata.jsonl.tmp"), "w") as f:
        for i in range(n):
            img = base.copy(); img[i % 64, :, :] = i % 251  # distinct content, cheap to make
            Image.fromarray(img).save(os.path.join(src, f"{i:06d}.png"), compress_level=1)
            f.write(json.dumps({"file_name": f"{i:06d}.png", "text": f"sample {i}"}) + "\n")
    os.replace(os.path.join(src, "metadata.jsonl.tmp"), os.path.join(src, "metadata.jsonl"))
from ppcl.data.shard import shard_source
t = time.perf_counter()
m, _ = shard_source(src, os.path.join(root, "out"), shards, progress=False)
dt = time.perf_counter() - t
print(json.dumps({"samples": m.accepted, "seconds": dt, "rate": m.accepted / dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _bench(tmp_path, n: int, shards: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _BENCH, str(tmp_path), str(n), str(shards)], env=env,
                       capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nshard benchmark n={n}: {result}")
    return result


@pytest.mark.slow
def test_bench_shard_rate(tmp_path):
    result = _bench(tmp_path, 5000, 8)
    assert result["samples"] == 5000
    assert result["rate"] >= 500, result


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bench_shard_100k_memory(tmp_path):
    t = time.perf_counter()
    result = _bench(tmp_path, 100_000, 64)
    assert result["samples"] == 100_000
    assert result["peak_rss_mb"] < 1024, result
    print(f"total with generation: {time.perf_counter() - t:.0f}s")


def test_reshard_from_another_source_writes_a_new_generation(tmp_path, capsys):
    """A changed shard never goes over a file the current manifest lists: it gets a generation name, the new
    manifest is swapped in, then the old generation's files are removed; encode-side verification passes."""
    out = tmp_path / "out"
    assert shard("--source", str(make_imagefolder(tmp_path / "a", 12)), "--out", str(out), "--shards", "2") == 0
    first = {s.name for s in read_shard_manifest(str(out)).shards}
    assert first == {"shard-00000-of-00002.parquet", "shard-00001-of-00002.parquet"}
    assert shard("--source", str(make_imagefolder(tmp_path / "b", 12, empty={0})), "--out", str(out),
                 "--shards", "2") == 0  # fmt: skip
    m = read_shard_manifest(str(out))  # verifies every listed checksum
    names = {s.name for s in m.shards}
    changed = names - first
    assert changed and all(len(n.split(".")) == 3 for n in changed)  # shard-i-of-n.<sha[:12]>.parquet
    assert {p.name for p in out.glob("shard-*")} == names  # the old generation's files are gone
    assert m.accepted == 11


def test_damaged_shard_is_named_by_the_reader(tmp_path):
    from ppcl.errors import PPCLError

    out = tmp_path / "out"
    assert shard("--source", str(make_imagefolder(tmp_path / "a", 8)), "--out", str(out), "--shards", "2") == 0
    victim = sorted(out.glob("shard-*"))[1]
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(PPCLError, match=rf"{victim.name}: \d+ bytes, the shard manifest records"):
        read_shard_manifest(str(out))
