"""A small synthetic inspection category in the MVTec AD layout, for demos and tests.

Every image is brushed metal: white noise smoothed along the rows (the brushing), slow shading
and grain, each image a new draw with its own small brightness offset. Defective test images
carry one of three drawn defects, and their masks are exactly the pixels that were changed:

- ``scratch``: a thin bright line, 2-3 px wide, crossing the brushing direction;
- ``hole``: a dark ellipse, 5-12 px in radius;
- ``stain``: an irregular yellowish blob, 12-24 px across.

    >>> cat = make_demo_dataset("data")          # data/demo/{train,test,ground_truth}
    >>> load_index(PRNConfig(dataset="demo", root="data"))
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import gaussian_filter

from prn.errors import DataError

DEFECT_TYPES = ("scratch", "hole", "stain")
_TINT = np.array([0.96, 1.0, 1.05])  # a cool steel cast


def _metal(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 (S, S, 3) brushed-metal texture, values around 140 of 255."""
    noise = rng.standard_normal((size, size), dtype=np.float32)
    streaks = gaussian_filter(noise, sigma=(0.7, 10), mode="wrap")
    # Slow shading from a coarse 6x6 grid, upsampled: far cheaper than a wide Gaussian.
    coarse = Image.fromarray(rng.standard_normal((6, 6)).astype(np.float32))
    shade = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC))
    grain = rng.standard_normal((size, size), dtype=np.float32)
    gray = (140 + rng.uniform(-8, 8) + 13 * streaks / streaks.std()
            + 6 * shade / shade.std() + 3 * grain)
    return gray[:, :, None] * _TINT.astype(np.float32)


def _scratch(rng: np.random.Generator, size: int) -> np.ndarray:
    length = rng.uniform(0.2, 0.4) * size
    angle = rng.uniform(np.pi / 6, 5 * np.pi / 6)  # never along the brushing
    cx, cy = rng.uniform(0.25, 0.75, size=2) * size
    # A slightly bent polyline: three segments with sideways jitter.
    t = np.linspace(-0.5, 0.5, 4)
    bend = rng.normal(0, 0.04 * length, size=4)
    xs = cx + t * length * np.cos(angle) - bend * np.sin(angle)
    ys = cy + t * length * np.sin(angle) + bend * np.cos(angle)
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).line(list(zip(xs, ys)), fill=255, width=int(rng.integers(2, 4)))
    return np.asarray(canvas) > 0


def _hole(rng: np.random.Generator, size: int) -> np.ndarray:
    rx, ry = rng.uniform(5, 12, size=2)
    cx, cy = rng.uniform(0.2, 0.8, size=2) * size
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return np.asarray(canvas) > 0


def _stain(rng: np.random.Generator, size: int) -> np.ndarray:
    radius = rng.uniform(6, 12)
    cx, cy = rng.uniform(0.2, 0.8, size=2) * size
    yy, xx = np.mgrid[:size, :size]
    dist = np.hypot(xx - cx, yy - cy) / radius
    # A wobbly outline: the unit disc pushed in and out by smooth noise.
    wobble = gaussian_filter(rng.standard_normal((size, size)), sigma=3)
    mask = dist + 0.4 * wobble / wobble.std() < 1
    return mask if mask.any() else dist < 1


def _add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Draw one defect into image (float (S, S, 3), changed in place); returns its bool mask."""
    size = image.shape[0]
    if kind == "scratch":
        mask = _scratch(rng, size)
        image[mask] += rng.uniform(45, 65)
    elif kind == "hole":
        mask = _hole(rng, size)
        depth = rng.uniform(0.35, 0.55)  # the hole keeps 35-55 % of the surface's brightness
        image[mask] = image[mask] * depth + rng.normal(0, 3, size=(int(mask.sum()), 1))
    else:
        mask = _stain(rng, size)
        image[mask] += np.array([38.0, 26.0, -12.0]) * rng.uniform(0.8, 1.2)
    return mask


def _save(image: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8)).save(path, compress_level=1)


def make_demo_dataset(root: str | Path, seed: int = 0, n_train: int = 40, n_test_good: int = 12,
                      n_test_defect: int = 12, size: int = 256) -> Path:
    """Write root/demo/ (MVTec layout) and return that category folder.

    Deterministic for a seed. Defect types take turns (scratch, hole, stain, scratch, ...).
    A folder already written with the same arguments is reused; one written with other
    arguments is replaced; any other non-empty root/demo is refused with DataError.
    """
    cat = Path(root) / "demo"
    params = {"seed": seed, "n_train": n_train, "n_test_good": n_test_good,
              "n_test_defect": n_test_defect, "size": size}
    marker = cat / "demo.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text()) == params:
                return cat
        except ValueError:
            pass
        shutil.rmtree(cat)
    elif cat.exists() and any(cat.iterdir()):
        raise DataError(f"{cat}: folder exists and was not written by make_demo_dataset; "
                        "choose another root or remove it")
    rng = np.random.default_rng(seed)
    for sub in ["train/good", "test/good"] + [f"{d}/{t}" for d in ("test", "ground_truth")
                                              for t in DEFECT_TYPES]:
        (cat / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_train):
        _save(_metal(rng, size), cat / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save(_metal(rng, size), cat / "test" / "good" / f"{i:03d}.png")
    for i in range(n_test_defect):
        kind, number = DEFECT_TYPES[i % len(DEFECT_TYPES)], i // len(DEFECT_TYPES)
        image = _metal(rng, size)
        mask = _add_defect(image, kind, rng)
        _save(image, cat / "test" / kind / f"{number:03d}.png")
        Image.fromarray(mask.astype(np.uint8) * 255).save(
            cat / "ground_truth" / kind / f"{number:03d}_mask.png")
    for kind in DEFECT_TYPES[n_test_defect:]:  # fewer defects than types: drop empty folders
        (cat / "test" / kind).rmdir()
        (cat / "ground_truth" / kind).rmdir()
    marker.write_text(json.dumps(params))
    return cat
