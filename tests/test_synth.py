"""ppcl synth: deterministic procedural captioned images in imagefolder format."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from ppcl.cli import main
from ppcl.data import synth


def test_same_seed_same_images_other_seed_differs():
    a = [(np.asarray(im), c) for im, c, _ in synth.iter_synth(40, size=32, seed=7)]
    b = [(np.asarray(im), c) for im, c, _ in synth.iter_synth(40, size=32, seed=7)]
    c = [(np.asarray(im), c) for im, c, _ in synth.iter_synth(40, size=32, seed=8)]
    assert all((x[0] == y[0]).all() and x[1] == y[1] for x, y in zip(a, b))
    assert sum((x[0] != y[0]).any() for x, y in zip(a, c)) > 30
    # A sample does not depend on how the set is iterated: sample 25 alone equals sample 25 in the run.
    im, cap, _ = synth.synth_sample(25, seed=7, size=32)
    assert (np.asarray(im) == a[25][0]).all() and cap == a[25][1]


def test_captions_state_what_is_drawn():
    size = 64
    kinds = set()
    for im, cap, attrs in synth.iter_synth(300, size=size, seed=3):
        kinds.add(attrs["kind"])
        parsed = synth.parse_caption(cap)
        for key in ("kind", "count", "shapes", "colours", "relation"):
            assert parsed[key] == attrs[key], (cap, key)
        px = np.asarray(im)
        # The pixel at each object's centre has the colour the caption names for it.
        for o, colour in zip(attrs["objects"], parsed["colours"]):
            y, x = int(o["y"] * size), int(o["x"] * size)
            assert tuple(px[y, x]) == synth.COLOURS[colour], (cap, o)
        if attrs["count"] == 2:
            a, b = attrs["objects"]
            if attrs["positions"] == ["left", "right"]:
                assert a["x"] + a["r"] < b["x"] - b["r"]  # first-named object strictly left of the second
            else:
                assert a["y"] + a["r"] < b["y"] - b["r"]
        if attrs["kind"] == "single":
            assert cap == f"a {parsed['colours'][0]} {parsed['shapes'][0]}"
    assert kinds == {"single", "relation", "pair"}
    assert synth.caption({"kind": "relation", "relation": "above", "objects": [
        {"shape": "circle", "colour": "red"}, {"shape": "square", "colour": "blue"}]}) == "a red circle above a blue square"


def test_parse_caption_rejects_other_wording():
    with pytest.raises(synth.PPCLError, match="not a synth caption"):
        synth.parse_caption("a purple hexagon")


def test_imagefolder_written_by_cli(tmp_path, capsys):
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--n", "25", "--size", "32", "--seed", "5"]) == 0
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 25 and len(list(out.glob("*.png"))) == 25
    for i, row in enumerate(rows):
        with Image.open(out / row["file_name"]) as im:
            assert im.size == (32, 32) and im.mode == "RGB"
            ref, cap, attrs = synth.synth_sample(i, seed=5, size=32)
            assert (np.asarray(im) == np.asarray(ref)).all()
        assert row["text"] == cap and row["count"] == attrs["count"] and row["shapes"] == attrs["shapes"]
        assert {"file_name", "text", "shapes", "colours", "positions", "count"} <= row.keys()
    try:  # the Hugging Face loader, where installed
        import datasets
    except ImportError:
        return
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), split="train")
    assert len(ds) == 25 and ds[0]["text"] == rows[0]["text"]


@pytest.mark.parametrize("argv, needle", [(["--n", "0"], "--n must be a positive"), (["--n", "-3"], "--n must be"),
                                          (["--n", "5", "--size", "4"], "--size must be at least")])
def test_bad_numbers_exit_2_one_line(tmp_path, capsys, argv, needle):
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and err.startswith("ppcl synth: error:")
    assert not out.exists()


def test_unwritable_out_exit_2_nothing_written(tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert main(["synth", "--out", str(blocker / "data"), "--n", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err
    assert main(["synth", "--out", str(blocker), "--n", "5"]) == 2  # an existing file is not a folder
    assert blocker.read_text() == "x"


def test_existing_output_replaced_whole(tmp_path):
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--n", "6", "--size", "32"]) == 0
    assert main(["synth", "--out", str(out), "--n", "3", "--size", "32"]) == 0
    assert len(list(out.glob("*.png"))) == 3 and len((out / "metadata.jsonl").read_text().splitlines()) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary left behind


@pytest.mark.slow
def test_speed_at_least_1000_images_per_second(tmp_path):
    t0 = time.perf_counter()
    synth.write_synth(tmp_path / "d", 3000, size=64)
    rate = 3000 / (time.perf_counter() - t0)
    print(f"synth 64px: {rate:.0f} images/s")
    assert rate >= 1000
