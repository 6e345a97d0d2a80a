"""Pictures of results: heat-map overlays and image grids, composed with PIL (no GUI backend).

``save_overlay`` writes one PNG with four panels side by side, like anomalib's visualiser:
image | ground truth | heat map blended on the image | predicted region's contour on the image.
Each panel is labelled above; an optional title runs across the top.

    save_overlay("out.png", image, amap, mask, threshold=0.5, title="bottle/broken_large/000")
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

GAP = 4            # pixels between and around panels
LABEL_HEIGHT = 16  # strip above each panel holding its label
TITLE_HEIGHT = 18  # strip above the labels when a title is given
BACKGROUND = (255, 255, 255)
CONTOUR_COLOR = (255, 0, 0)
# Pillow's bundled font at its default 10 px ran words together ("No ground truth" read as
# "Noground truth"); at 12 px the spaces show and the text still fits the label strip.
FONT_SIZE = 12
# zlib's fastest level for every PNG prn writes (pictures, maps, masks, served overlays): Pillow's
# default (6) took 149 ms to write a KolektorSDD overlay (1024 x 409, 404 KB) where level 1 took
# 26 ms (486 KB), and 29 against 11 ms for a map (BENCHMARKS.md); the pixels are the same
PNG_COMPRESS_LEVEL = 1


def png_bytes(array: np.ndarray) -> bytes:
    """A uint8 (H, W) or (H, W, 3) array as the bytes of a PNG file."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


@cache
def label_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The font of every label and title: Pillow's bundled one at ``FONT_SIZE`` (its bitmap
    fallback where Pillow was built without FreeType)."""
    return ImageFont.load_default(size=FONT_SIZE)


def panel_shape(hw: tuple[int, int], panel_size: int | None) -> tuple[int, int]:
    """(height, width) of a panel: the image's shape with its longer side scaled to panel_size."""
    h, w = hw
    if panel_size is None:
        return h, w
    scale = panel_size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def _resize(array: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize uint8 (H, W[, 3]) or float (H, W) arrays to shape (h, w) with PIL."""
    if array.shape[:2] == shape:
        return array
    if array.dtype != np.uint8:
        array = array.astype(np.float32)  # PIL's 32-bit float mode
    mode = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((shape[1], shape[0]), mode))


def to_rgb(array: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) from RGB uint8, grey uint8 (H, W), bool masks, or floats in [0, 1]."""
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an image (H, W), (H, W, 3), got shape {array.shape}")
    return array


def colorize(amap: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """uint8 (H, W, 3) colours of a float map in [0, 1] (values outside are clipped)."""
    rgba = colormaps[cmap](np.clip(amap, 0.0, 1.0))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def heat_overlay(image: np.ndarray, amap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The colour-mapped amap blended on the image with weight alpha. uint8 (H, W, 3)."""
    blend = (1 - alpha) * image.astype(np.float32) + alpha * colorize(amap).astype(np.float32)
    return blend.round().astype(np.uint8)


def contour_overlay(image: np.ndarray, region: np.ndarray, width: int = 2,
                    color: tuple[int, int, int] = CONTOUR_COLOR) -> np.ndarray:
    """The image with the inner border (``width`` px) of a bool region painted in color."""
    border = region & ~ndimage.binary_erosion(region, iterations=width, border_value=0)
    out = image.copy()
    out[border] = color
    return out


def _compose(panels: list[list[np.ndarray | None]], labels: list[str] | None,
             title: str | None, cell: tuple[int, int]) -> Image.Image:
    """Lay uint8 (h, w, 3) panels out in rows on one canvas; None cells stay blank."""
    ch, cw = cell
    columns = max(len(row) for row in panels)
    top = (TITLE_HEIGHT if title else 0) + (LABEL_HEIGHT if labels else 0)
    width = columns * cw + (columns + 1) * GAP
    height = top + len(panels) * (ch + GAP) + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((GAP, 3), title, fill=(0, 0, 0), font=label_font())
    for j, label in enumerate(labels or []):
        draw.text((GAP + j * (cw + GAP), top - LABEL_HEIGHT + 2), label, fill=(0, 0, 0),
                  font=label_font())
    for i, row in enumerate(panels):
        for j, panel in enumerate(row):
            if panel is not None:
                canvas.paste(Image.fromarray(panel), (GAP + j * (cw + GAP), top + GAP + i * (ch + GAP)))
    return canvas


def save_overlay(path: str | Path, image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None = None,
                 threshold: float | None = None, title: str | None = None,
                 panel_size: int | None = 256, region_label: str | None = None) -> Path:
    """Save image | ground truth | heat map | predicted contour as one PNG.

    image: uint8 (H, W, 3) (or (H, W) grey); amap: float (H, W) in [0, 1]; mask: bool (H, W) or
    None (the ground-truth panel is then grey). threshold: pixels with ``amap >= threshold`` form
    the predicted region (default 0.5). panel_size: each panel's longer side in pixels (None:
    the image's own size). region_label: the last panel's label (default "Prediction (>=
    threshold)"), for a map drawn rescaled, whose 0.5 stands for another threshold. The PNG is
    ``4 * w + 5 * GAP`` wide and ``h + 2 * GAP + LABEL_HEIGHT`` (+ ``TITLE_HEIGHT`` with a title)
    high, for panels of (h, w).
    """
    image, amap = to_rgb(image), np.asarray(amap, dtype=np.float32)
    if amap.shape != image.shape[:2] or (mask is not None and np.shape(mask) != amap.shape):
        raise ValueError(f"image {image.shape[:2]}, map {amap.shape} and mask "
                         f"{None if mask is None else np.shape(mask)} must share (H, W)")
    threshold = 0.5 if threshold is None else threshold
    shape = panel_shape(amap.shape, panel_size)
    image, amap = _resize(image, shape), _resize(amap, shape)
    if mask is None:
        truth = np.full((*shape, 3), 160, np.uint8)
    else:
        truth = to_rgb(_resize((np.asarray(mask) > 0).astype(np.uint8), shape, nearest=True) > 0)
    panels = [image, truth, heat_overlay(image, amap), contour_overlay(image, amap >= threshold)]
    labels = ["Image", "Ground truth" if mask is not None else "No ground truth", "Heat map",
              region_label or f"Prediction (>= {threshold:.2f})"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _compose([panels], labels, title, shape).save(path, compress_level=PNG_COMPRESS_LEVEL)
    return path


def save_grid(path: str | Path, rows: list[list[np.ndarray]], titles: list[str] | None = None,
              cell_size: int = 128) -> Path:
    """Save a grid of pictures as one PNG: rows of arrays, titles over the columns.

    Cells may be uint8 (H, W, 3) or (H, W), bool masks or floats in [0, 1]; each is scaled to a
    cell_size x cell_size square (aspect kept, centred). Rows may differ in length. The PNG is
    ``C * cell_size + (C + 1) * GAP`` wide for C columns.
    """
    if not rows or not any(rows):
        raise ValueError("save_grid needs at least one picture")
    columns = max(len(row) for row in rows)
    if titles is not None and len(titles) != columns:
        raise ValueError(f"got {len(titles)} titles for {columns} columns")
    cells = []
    for row in rows:
        out_row = []
        for picture in row:
            rgb = to_rgb(picture)
            h, w = panel_shape(rgb.shape[:2], cell_size)
            square = np.full((cell_size, cell_size, 3), BACKGROUND, np.uint8)
            y, x = (cell_size - h) // 2, (cell_size - w) // 2
            square[y:y + h, x:x + w] = _resize(rgb, (h, w))
            out_row.append(square)
        cells.append(out_row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _compose(cells, titles, None, (cell_size, cell_size)).save(path, compress_level=PNG_COMPRESS_LEVEL)
    return path
