"""Target areas (TA, Sec. 3.4): where generated anomalies may be placed.

A target area is a random circle, rectangle or polygon of random size and position. For texture
categories it may lie anywhere; for object categories it is intersected with the object's
foreground, estimated from the normal image itself:

1. grayscale, Gaussian blur (sigma ~ S/128) so texture and noise do not split the object;
2. Otsu's threshold splits pixels into bright and dark;
3. the class holding most of the image border is the background (objects are photographed
   centred on a plain backdrop, dark or bright);
4. clean-up with scipy.ndimage: opening removes specks, small components (< 1% of the image)
   go unless they are the largest one, holes are filled;
5. if the result covers less than 1% of the image, the estimate is not trusted and the whole
   image is the foreground.

    >>> rng = np.random.default_rng(0)
    >>> sample_target_area((64, 64), rng).dtype
    dtype('bool')
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

SHAPES = ("circle", "rectangle", "polygon")
SIZE_RANGE = (0.25, 0.75)  # extent of a target area, as a share of the image's shorter side
MIN_FOREGROUND = 0.01      # foreground estimates smaller than this share of the image are ignored
MAX_TRIES = 10


def otsu_threshold(values: np.ndarray) -> float:
    """Otsu's threshold of 8-bit-range values: the cut maximising between-class variance.

    Written by hand: scikit-image, which has it, is not a dependency of prn.
    """
    hist, edges = np.histogram(values, bins=256, range=(0.0, 256.0))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (s0 * w1 - (s0[-1] - s0) * w0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Estimated object foreground of a uint8 (H, W, 3) image: bool (H, W), never empty."""
    h, w = image.shape[:2]
    gray = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    gray = ndimage.gaussian_filter(gray, sigma=max(1.0, min(h, w) / 128))
    bright = gray >= otsu_threshold(gray)
    border = np.concatenate([bright[0], bright[-1], bright[:, 0], bright[:, -1]])
    fg = ~bright if border.mean() > 0.5 else bright

    radius = max(1, min(h, w) // 64)
    disk = np.hypot(*np.mgrid[-radius:radius + 1, -radius:radius + 1]) <= radius
    fg = ndimage.binary_opening(fg, structure=disk)
    labels, n = ndimage.label(fg)
    if n:
        sizes = np.bincount(labels.ravel())[1:]
        keep = (sizes >= MIN_FOREGROUND * h * w) | (sizes == sizes.max())
        fg = keep[labels - 1] & (labels > 0)
    fg = ndimage.binary_fill_holes(fg)
    if fg.sum() < MIN_FOREGROUND * h * w:
        return np.ones((h, w), bool)
    return fg


def draw_shape(hw: tuple[int, int], rng: np.random.Generator, center: tuple[float, float],
               shape: str | None = None, size_range: tuple[float, float] = SIZE_RANGE) -> np.ndarray:
    """A random ``shape`` (circle, rectangle or polygon) around ``center`` (x, y), of extent
    ``size_range`` (shares of the shorter side): bool (H, W)."""
    h, w = hw
    shape = shape or SHAPES[int(rng.integers(len(SHAPES)))]
    extent = rng.uniform(*size_range) * min(h, w)
    cx, cy = center
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    if shape == "circle":
        r = extent / 2
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif shape == "rectangle":
        half_w, half_h = extent / 2, extent / 2 * rng.uniform(0.3, 1.0)
        if rng.random() < 0.5:
            half_w, half_h = half_h, half_w
        draw.rectangle([cx - half_w, cy - half_h, cx + half_w, cy + half_h], fill=1)
    elif shape == "polygon":
        n = int(rng.integers(5, 11))
        # Evenly spread angles with bounded jitter keep every gap below pi, so the centre is inside.
        angles = np.arange(n) * 2 * np.pi / n + rng.uniform(-0.25, 0.25, n) * 2 * np.pi / n
        radii = extent / 2 * rng.uniform(0.4, 1.0, n)
        draw.polygon(list(zip(cx + radii * np.cos(angles), cy + radii * np.sin(angles))), fill=1)
    else:
        raise ValueError(f"unknown target-area shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas, dtype=bool)


def sample_target_area(hw: tuple[int, int], rng: np.random.Generator,
                       foreground: np.ndarray | None = None, shape: str | None = None,
                       size_range: tuple[float, float] = SIZE_RANGE) -> np.ndarray:
    """A random target area of an (H, W) image: bool (H, W), non-empty.

    foreground: bool (H, W) or None. When given, the area is centred on a random foreground pixel
    and clipped to the foreground; empty draws are retried, and in the end a small disk around a
    foreground pixel (clipped) is returned, which always holds that pixel.
    """
    h, w = hw
    if foreground is not None and not foreground.any():
        foreground = None
    ys, xs = np.nonzero(foreground) if foreground is not None else (None, None)

    def pick_center() -> tuple[float, float]:
        if foreground is None:
            return float(rng.uniform(0, w - 1)), float(rng.uniform(0, h - 1))
        k = int(rng.integers(len(ys)))
        return float(xs[k]), float(ys[k])

    for _ in range(MAX_TRIES):
        area = draw_shape(hw, rng, pick_center(), shape, size_range)
        if foreground is not None:
            area &= foreground
        if area.any():
            return area
    cx, cy = pick_center()
    yy, xx = np.mgrid[0:h, 0:w]
    area = np.hypot(yy - cy, xx - cx) <= max(2.0, size_range[0] * min(h, w) / 2)
    return area & foreground if foreground is not None else area
