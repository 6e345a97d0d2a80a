"""2-D Perlin noise and the thresholded Perlin masks of simulated anomalies (Sec. A.1, DRAEM).

Written by hand: no maintained library offers vectorised 2-D gradient noise driven by a
``numpy.random.Generator``.
The noise is evaluated at arbitrary coordinates, so a rotated field is computed directly on
rotated coordinates instead of resampling an image (no blur, no empty corners).

    >>> rng = np.random.default_rng(0)
    >>> perlin_noise((64, 64), (4, 4), rng).shape
    (64, 64)
"""

from __future__ import annotations

import math

import numpy as np

# DRAEM draws the per-axis lattice resolution as 2**randint(0, 6): 1, 2, ..., 32 cells per side.
MIN_SCALE_EXP = 0
MAX_SCALE_EXP = 6  # exclusive, as in DRAEM
MAX_ROTATION = 90.0  # degrees, DRAEM's Affine(rotate=(-90, 90))
MIN_CELL = 8  # pixels per lattice cell, at least


def _fade(t: np.ndarray) -> np.ndarray:
    # Perlin's quintic 6t^5 - 15t^4 + 10t^3: zero first and second derivatives at lattice points.
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def perlin_at(y: np.ndarray, x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Perlin noise at lattice coordinates.

    y, x: float arrays that broadcast together, in lattice units, with 0 <= y < rows - 1 and
    0 <= x < cols - 1. angles: float (rows, cols) gradient angles (radians) at the lattice corners.
    Returns float32 of the broadcast shape, in [-1, 1] and zero on lattice points.
    """
    cols = angles.shape[1]
    gy = np.cos(angles).astype(np.float32).ravel()
    gx = np.sin(angles).astype(np.float32).ravel()
    y0, x0 = np.floor(y), np.floor(x)
    fy, fx = (y - y0).astype(np.float32), (x - x0).astype(np.float32)
    base = y0.astype(np.int64) * cols + x0.astype(np.int64)

    def corner(dy: int, dx: int) -> np.ndarray:
        # The gradient at corner (dy, dx) of each point's cell, dotted with the offset to it.
        idx = base + (dy * cols + dx)
        return gy.take(idx) * (fy - dy) + gx.take(idx) * (fx - dx)

    uy, ux = _fade(fy), _fade(fx)
    top = corner(0, 0) * (1 - ux) + corner(0, 1) * ux
    bottom = corner(1, 0) * (1 - ux) + corner(1, 1) * ux
    # 2-D Perlin noise lies in [-sqrt(1/2), sqrt(1/2)]; DRAEM scales it to [-1, 1], which its
    # threshold 0.5 assumes.
    return (math.sqrt(2.0) * (top * (1 - uy) + bottom * uy)).astype(np.float32)


def perlin_from_angles(shape: tuple[int, int], angles: np.ndarray) -> np.ndarray:
    """Perlin noise over an (H, W) image spanning ``angles.shape - 1`` lattice cells: float32 (H, W)."""
    h, w = shape
    ry, rx = angles.shape[0] - 1, angles.shape[1] - 1
    y = (np.arange(h) * (ry / h))[:, None]
    x = (np.arange(w) * (rx / w))[None, :]
    return perlin_at(y, x, angles)


def perlin_noise(shape: tuple[int, int], res: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Perlin noise of ``res = (ry, rx)`` lattice cells over an (H, W) image: float32 (H, W) in [-1, 1]."""
    ry, rx = int(res[0]), int(res[1])
    if ry < 1 or rx < 1:
        raise ValueError(f"Perlin resolution must be >= 1 per axis, got {res}")
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(ry + 1, rx + 1))
    return perlin_from_angles(shape, angles)


def random_perlin_noise(shape: tuple[int, int], rng: np.random.Generator,
                        scales: tuple[int, int] = (MIN_SCALE_EXP, MAX_SCALE_EXP)) -> np.ndarray:
    """DRAEM's noise: 2^0..2^5 lattice cells per image side on each axis (at most one per 8
    pixels), rotated by a random angle in [-90, 90] degrees. float32 (H, W) in [-1, 1]."""
    h, w = shape
    # scales: exponents [lo, hi) of the lattice cells per side; a low hi makes large blobs only.
    ry, rx = (2 ** int(e) for e in rng.integers(scales[0], max(scales[0] + 1, scales[1]), size=2))
    # DRAEM's finest lattice has 8-pixel cells at 256 px; keep that floor on smaller images,
    # where finer cells would only make speckle.
    ry, rx = max(1, min(ry, h // MIN_CELL)), max(1, min(rx, w // MIN_CELL))
    t = math.radians(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    py = np.arange(h)[:, None] - (h - 1) / 2
    px = np.arange(w)[None, :] - (w - 1) / 2
    # Rotated pixel coordinates, in lattice units, shifted so the lattice starts at 0.
    y = (py * math.cos(t) - px * math.sin(t)) * (ry / h)
    x = (py * math.sin(t) + px * math.cos(t)) * (rx / w)
    y, x = y - y.min(), x - x.min()
    angles = rng.uniform(0.0, 2.0 * np.pi, size=(int(y.max()) + 2, int(x.max()) + 2))
    return perlin_at(y, x, angles)


def perlin_mask(shape: tuple[int, int], rng: np.random.Generator, threshold: float = 0.5,
                scales: tuple[int, int] = (MIN_SCALE_EXP, MAX_SCALE_EXP)) -> np.ndarray:
    """Thresholded random Perlin noise (blobs of varied size, shape and number): bool (H, W).

    May be empty for high thresholds; callers retry.
    """
    return random_perlin_noise(shape, rng, scales) > threshold
