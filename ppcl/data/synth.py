"""Procedural captioned images: coloured shapes at positions, with captions that state exactly what is drawn.

Used by the tests, the demo and the reference benchmark (issue 9): a small teacher learns to draw these
captions, and a small classifier (the judge, :mod:`ppcl.bench.judge`) checks whether an image shows what its
caption says.

Attribute space (chosen so a tiny model can learn it at 32 px and a judge can score every stated attribute):

- ``SHAPES`` (K=3) x ``COLOURS`` (C=4).
- Three scene kinds, equally likely:
  - ``single``: one object near the centre. Caption ``"a red circle"``. States count=1, shape, colour.
  - ``relation``: two different objects (they differ in shape, colour or both), side by side or one above the
    other. Caption ``"a red circle to the left of a blue square"`` / ``"a red circle above a blue square"``.
    The first-named object is always the left (or top) one, so the caption is canonical. States count=2,
    the arrangement, and shape and colour of both objects.
  - ``pair``: two identical objects, side by side or one above the other. Caption ``"two green triangles"``.
    States count=2, shape and colour (of both); the arrangement is drawn but not stated.

Each row's attributes (``attributes`` dict, JSON-serialisable) carry ``kind``, ``count``, ``shapes``,
``colours``, ``positions`` (``centre`` / ``left`` / ``right`` / ``top`` / ``bottom`` per object, in slot
order: slot a = the single object or the left/top one, slot b = the right/bottom one), ``relation``
(``left_of`` / ``above`` / ``None``) and ``objects`` (exact geometry in units of the image side, so the image
can be re-rendered from its row).

Determinism: sample ``i`` of seed ``s`` comes from ``numpy.random.default_rng([s, i])``, so any sample can be
regenerated alone and the dataset does not depend on how it is iterated or chunked.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ppcl.atomic import atomic_path
from ppcl.errors import PPCLError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 200, 30),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
KINDS: tuple[str, ...] = ("single", "relation", "pair")
ARRANGEMENTS: tuple[str, ...] = ("horizontal", "vertical")
BACKGROUND = (235, 235, 235)
_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles"}
MIN_SIZE = 16


def sample_attributes(rng: np.random.Generator) -> dict[str, Any]:
    """Draw one scene's attributes (see module docstring). Geometry in units of the image side."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind == "single":
        shape, colour = SHAPES[int(rng.integers(len(SHAPES)))], COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        objects = [
            {
                "shape": shape,
                "colour": colour,
                "x": 0.5 + float(rng.uniform(-0.06, 0.06)),
                "y": 0.5 + float(rng.uniform(-0.06, 0.06)),
                "r": float(rng.uniform(0.22, 0.28)),
            }
        ]
        return _finish(kind, None, objects, ["centre"])
    arrangement = ARRANGEMENTS[int(rng.integers(2))]
    if kind == "relation":
        # Two different objects: draw slot b until it differs from slot a in shape or colour.
        a = (int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOUR_NAMES))))
        b = a
        while b == a:
            b = (int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOUR_NAMES))))
    else:
        a = b = (int(rng.integers(len(SHAPES))), int(rng.integers(len(COLOUR_NAMES))))
    # Slot a at the left (top), slot b at the right (bottom); the other coordinate jitters around the centre.
    main = [0.27 + float(rng.uniform(-0.04, 0.04)), 0.73 + float(rng.uniform(-0.04, 0.04))]
    cross = [0.5 + float(rng.uniform(-0.08, 0.08)) for _ in range(2)]
    objects = []
    for slot, (s, c) in enumerate((a, b)):
        x, y = (main[slot], cross[slot]) if arrangement == "horizontal" else (cross[slot], main[slot])
        objects.append(
            {"shape": SHAPES[s], "colour": COLOUR_NAMES[c], "x": x, "y": y, "r": float(rng.uniform(0.15, 0.19))}
        )
    positions = ["left", "right"] if arrangement == "horizontal" else ["top", "bottom"]
    relation = ("left_of" if arrangement == "horizontal" else "above") if kind == "relation" else None
    return _finish(kind, relation, objects, positions)


def _finish(kind: str, relation: str | None, objects: list[dict], positions: list[str]) -> dict[str, Any]:
    return {
        "kind": kind,
        "count": len(objects),
        "shapes": [o["shape"] for o in objects],
        "colours": [o["colour"] for o in objects],
        "positions": positions,
        "relation": relation,
        "objects": objects,
    }


def caption(attributes: dict[str, Any]) -> str:
    """The caption stating exactly what ``attributes`` draws (canonical wording, one per scene)."""
    kind = attributes["kind"]
    o = attributes["objects"]
    if kind == "single":
        return f"a {o[0]['colour']} {o[0]['shape']}"
    if kind == "pair":
        return f"two {o[0]['colour']} {_PLURAL[o[0]['shape']]}"
    link = "to the left of" if attributes["relation"] == "left_of" else "above"
    return f"a {o[0]['colour']} {o[0]['shape']} {link} a {o[1]['colour']} {o[1]['shape']}"


def parse_caption(text: str) -> dict[str, Any]:
    """Attributes stated by a canonical synth caption (inverse of :func:`caption`, without geometry).

    For ``pair`` captions the arrangement is not stated, so ``positions`` is ``None``; ``objects`` is empty.
    Raises PPCLError for any other wording.
    """
    import re

    c, s = "|".join(COLOUR_NAMES), "|".join(SHAPES)
    t = " ".join(text.lower().split())
    if m := re.fullmatch(rf"a ({c}) ({s})", t):
        return {"kind": "single", "count": 1, "shapes": [m[2]], "colours": [m[1]], "positions": ["centre"],
                "relation": None, "objects": []}
    if m := re.fullmatch(rf"two ({c}) ({s})s", t):
        return {"kind": "pair", "count": 2, "shapes": [m[2]] * 2, "colours": [m[1]] * 2, "positions": None,
                "relation": None, "objects": []}
    if m := re.fullmatch(rf"a ({c}) ({s}) (to the left of|above) a ({c}) ({s})", t):
        horizontal = m[3] == "to the left of"
        return {"kind": "relation", "count": 2, "shapes": [m[2], m[5]], "colours": [m[1], m[4]],
                "positions": ["left", "right"] if horizontal else ["top", "bottom"],
                "relation": "left_of" if horizontal else "above", "objects": []}
    raise PPCLError(f"not a synth caption: {text!r}")


def render(attributes: dict[str, Any], size: int = 64) -> Image.Image:
    """Draw ``attributes`` as an RGB ``size`` x ``size`` image (flat colours on a light grey background)."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in attributes["objects"]:
        cx, cy, r, fill = o["x"] * size, o["y"] * size, o["r"] * size, COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            h = r * 0.85  # a square of the same visual weight as the circle
            draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
        else:  # upward equilateral triangle inscribed in the circle of radius r, nudged down to look centred
            dy = r * 0.15
            pts = [
                (cx + r * math.cos(a), cy + dy - r * math.sin(a))
                for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)
            ]
            draw.polygon(pts, fill=fill)
    return img


def synth_sample(index: int, seed: int = 0, size: int = 64) -> tuple[Image.Image, str, dict[str, Any]]:
    """Sample ``index`` of the dataset with ``seed``: (RGB image size x size, caption, attributes)."""
    attrs = sample_attributes(np.random.default_rng([seed, index]))
    return render(attrs, size), caption(attrs), attrs


def iter_synth(
    n: int, size: int = 64, seed: int = 0, start: int = 0
) -> Iterator[tuple[Image.Image, str, dict[str, Any]]]:
    """Yield ``n`` samples ``start .. start+n-1`` in memory (no files): (PIL image, caption, attributes)."""
    _check(n, size)
    for i in range(start, start + n):
        yield synth_sample(i, seed, size)


def synth_arrays(n: int, size: int = 32, seed: int = 0, start: int = 0) -> tuple[np.ndarray, list[str], list[dict]]:
    """``n`` samples as a uint8 array (n, size, size, 3), their captions and attributes (for training)."""
    images, captions, attrs = [], [], []
    for img, cap, a in iter_synth(n, size, seed, start):
        images.append(np.asarray(img))
        captions.append(cap)
        attrs.append(a)
    return np.stack(images), captions, attrs


def _check(n: int, size: int) -> None:
    if not isinstance(n, int) or n <= 0:
        raise PPCLError(f"--n must be a positive number of images, got {n}")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise PPCLError(f"--size must be at least {MIN_SIZE} pixels, got {size}")


def write_synth(out: str | os.PathLike, n: int, size: int = 64, seed: int = 0, progress: bool = False) -> Path:
    """Write ``n`` samples as a Hugging Face imagefolder: OUT/NNNNNNNN.png + OUT/metadata.jsonl.

    Each metadata row holds ``file_name``, ``text`` (the caption) and the attributes (see module docstring).
    The folder appears complete or not at all (written under a temporary name, renamed at the end).
    """
    _check(n, size)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PPCLError(f"--out {out} exists and is not a folder")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise PPCLError(f"cannot create the parent folder of --out {out}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PPCLError(f"--out {out}: folder {parent} is not writable")
    width = max(8, len(str(n - 1)))
    try:
        with atomic_path(out, directory=True) as tmp:
            rows = []
            it = iter_synth(n, size, seed)
            if progress:
                from ppcl.progress import progress as tqdm

                it = tqdm(it, total=n, desc="synth", unit="img")
            for i, (img, cap, attrs) in enumerate(it):
                name = f"{i:0{width}d}.png"
                # compress_level=1: these flat images compress well anyway; level 6 would halve the speed.
                img.save(tmp / name, compress_level=1)
                rows.append(json.dumps({"file_name": name, "text": cap, **attrs}))
            (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    except OSError as e:
        raise PPCLError(f"cannot write --out {out}: {e.strerror or e}") from None
    return out
