"""Source textures of heterologous anomalies (Sec. 3.4, A.1): a DTD-like folder or built-in ones.

The paper draws textures from DTD (Describable Textures Dataset). ``TextureSource(folder, S)``
samples any image under ``folder`` (DTD's ``dtd/images/<class>/*.jpg`` or any tree of images),
takes a random square crop and resizes it to S x S. Without a folder it paints a procedural
texture (fBm noise, stripes, checkerboards, grids, dots, marbling, each in a random palette), so
the default works offline.

    >>> TextureSource(None, 64).sample(np.random.default_rng(0)).shape
    (64, 64, 3)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from prn.anomalies.perlin import perlin_noise
from prn.data.io import read_image, require_images


def list_images(folder: str | Path) -> list[Path]:
    """All image files under ``folder`` (any depth), sorted so a seed picks the same file everywhere."""
    return require_images(Path(folder), what="texture folder")


def random_square_resize(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A random square crop of the largest side that fits, resized to (size, size, 3) uint8."""
    h, w = image.shape[:2]
    side = min(h, w)
    top = int(rng.integers(0, h - side + 1))
    left = int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(image[top:top + side, left:left + side])
    return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


# ---- procedural textures: scalar fields in [0, 1], coloured by a random palette ----

def _normalise(field: np.ndarray) -> np.ndarray:
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / (hi - lo) if hi > lo else np.zeros_like(field)


def _fbm(size: int, rng: np.random.Generator, base: int | None = None, octaves: int = 4) -> np.ndarray:
    """Fractal Brownian motion: Perlin octaves of doubling frequency and halving weight, in [0, 1]."""
    base = int(rng.integers(1, 6)) if base is None else base
    field = np.zeros((size, size), np.float32)
    for o in range(octaves):
        res = min(base * 2 ** o, size // 2)
        field += perlin_noise((size, size), (res, res), rng) * 0.5 ** o
    return _normalise(field)


def _rotated_coords(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [0, 1) rotated by a random angle: (u, v), each float (size, size)."""
    t = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:size, 0:size] / size
    return x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)


def _fbm_texture(size: int, rng: np.random.Generator) -> np.ndarray:
    return _fbm(size, rng, octaves=int(rng.integers(2, 6)))


def _stripes(size: int, rng: np.random.Generator) -> np.ndarray:
    u, _ = _rotated_coords(size, rng)
    freq = rng.uniform(3, 24)
    warp = rng.uniform(0, 3) * _fbm(size, rng)
    wave = np.sin(2 * np.pi * (freq * u + warp))
    return wave > rng.uniform(-0.5, 0.5) if rng.random() < 0.5 else 0.5 + 0.5 * wave


def _checker(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated_coords(size, rng)
    freq = rng.uniform(2, 16)
    return (np.floor(u * freq) + np.floor(v * freq)) % 2


def _grid(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated_coords(size, rng)
    freq, width = rng.uniform(3, 20), rng.uniform(0.05, 0.3)
    return ((u * freq) % 1 < width) | ((v * freq) % 1 < width)


def _dots(size: int, rng: np.random.Generator) -> np.ndarray:
    u, v = _rotated_coords(size, rng)
    freq, radius = rng.uniform(4, 24), rng.uniform(0.15, 0.45)
    du, dv = (u * freq) % 1 - 0.5, (v * freq) % 1 - 0.5
    return np.hypot(du, dv) < radius


def _marble(size: int, rng: np.random.Generator) -> np.ndarray:
    u, _ = _rotated_coords(size, rng)
    turbulence = rng.uniform(2, 8) * _fbm(size, rng)
    return 0.5 + 0.5 * np.sin(2 * np.pi * (rng.uniform(1, 6) * u) + turbulence)


PATTERNS: dict[str, Callable[[int, np.random.Generator], np.ndarray]] = {
    "fbm": _fbm_texture, "stripes": _stripes, "checker": _checker, "grid": _grid,
    "dots": _dots, "marble": _marble,
}


def _colourise(field: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Maps a field in [0, 1] through a random palette of 2-5 colours: float (H, W, 3) in [0, 255]."""
    stops = int(rng.integers(2, 6))
    colours = rng.uniform(0, 255, size=(stops, 3))
    at = np.linspace(0, 1, stops)
    return np.stack([np.interp(field, at, colours[:, c]) for c in range(3)], axis=-1)


def procedural_texture(size: int, rng: np.random.Generator, pattern: str | None = None) -> np.ndarray:
    """One procedural texture: uint8 (size, size, 3). ``pattern``: a key of PATTERNS or random."""
    name = pattern or list(PATTERNS)[int(rng.integers(len(PATTERNS)))]
    field = PATTERNS[name](size, rng).astype(np.float32)
    image = _colourise(field, rng)
    # Fine grain and a soft low-frequency shading, as real surfaces have.
    image = image * (0.75 + 0.5 * _fbm(size, rng, octaves=2))[..., None]
    image = image + rng.normal(0, rng.uniform(0, 12), size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


class TextureSource:
    """Textures for heterologous anomalies. ``sample(rng) -> uint8 (size, size, 3)``.

    texture_dir: a folder of images (DTD layout or any tree), or None for procedural textures.
    Raises DataError at construction if the folder is missing or holds no images.
    """

    def __init__(self, texture_dir: str | Path | None, size: int, max_pixels: int = 50_000_000):
        self.size = int(size)
        self.max_pixels = max_pixels
        self.files = list_images(texture_dir) if texture_dir else []

    def sample(self, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
        """A random texture: uint8 (S, S, 3), S = ``size`` or the source's size."""
        size = self.size if size is None else int(size)
        if not self.files:
            return procedural_texture(size, rng)
        path = self.files[int(rng.integers(len(self.files)))]
        return random_square_resize(read_image(path, max_pixels=self.max_pixels), size, rng)
