"""grid.png: the teacher and each model side by side on the same samples, prompts as captions.

Layout: one column per model (teacher first, name on top), one row per sample; above each row a caption band
with the prompt and the seed. Cells smaller than ``min_cell`` pixels are upscaled by an integer factor with
nearest-neighbour sampling so tiny test images stay visible and captions readable.
"""

from __future__ import annotations

import io
import textwrap

import numpy as np
import torch


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def to_pil(image: torch.Tensor):
    """(3, H, W) float in [0, 1] -> PIL RGB image (8-bit rounding)."""
    from PIL import Image

    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB")


def render_grid(columns: list[tuple[str, list[torch.Tensor]]], captions: list[str], *, min_cell: int = 128):
    """Compose the grid.

    Args:
        columns: (model name, images) pairs; every column holds one (3, H, W) image in [0, 1] per caption.
        captions: one caption per row.
    Returns:
        a PIL RGB image.
    """
    from PIL import Image, ImageDraw

    if not columns or not captions:
        raise ValueError("grid needs at least one column and one row")
    h, w = columns[0][1][0].shape[-2:]
    scale = max(1, -(-min_cell // min(h, w)))
    ch, cw = h * scale, w * scale
    pad = 6
    font = _font(12)
    chars = max(12, (cw * len(columns)) // 7)
    wrapped = [textwrap.wrap(c, chars)[:3] or [""] for c in captions]
    line_h = 15
    header_h = line_h + 2 * pad
    band = [len(lines) * line_h + pad for lines in wrapped]
    width = pad + len(columns) * (cw + pad)
    height = header_h + sum(b + ch + pad for b in band)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    for c, (name, _) in enumerate(columns):
        label = name if len(name) * 7 <= cw else name[: max(3, cw // 7 - 1)] + "…"
        draw.text((pad + c * (cw + pad), pad), label, fill="black", font=font)
    y = header_h
    for r, lines in enumerate(wrapped):
        for k, line in enumerate(lines):
            draw.text((pad, y + k * line_h), line, fill=(60, 60, 60), font=font)
        y += band[r]
        for c, (_, images) in enumerate(columns):
            cell = to_pil(images[r])
            if scale > 1:
                cell = cell.resize((cw, ch), Image.NEAREST)
            grid.paste(cell, (pad + c * (cw + pad), y))
        y += ch + pad
    return grid


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
