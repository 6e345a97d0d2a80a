"""Simulated anomalies (SA, Sec. 3.4 and A.1, Eq. 6): Perlin-shaped patches of a foreign source.

    S = (1 - M) * N + (1 - beta) * (M * A) + beta * (M * N),   M = Perlin mask & target area

- heterologous (HEA): A = Aug1(texture) (DTD or procedural);
- homologous (HOA): A = Aug1(normal), cut into a g x g grid whose cells are shuffled.

As for extended anomalies, the mask keeps only pixels the blend changed (see extended.py).
"""

from __future__ import annotations

import math

import numpy as np

from prn.anomalies.augment import aug1
from prn.anomalies.extended import BLEND_TRIES, MIN_AREA, blend, inverted_patch
from prn.anomalies.perlin import perlin_mask, random_perlin_noise

PERLIN_TRIES = 10  # Perlin redraws when the thresholded noise misses the target area


def perlin_in_target(target: np.ndarray, rng: np.random.Generator, threshold: float,
                     scales: tuple[int, int] = (0, 6)) -> np.ndarray:
    """Perlin mask & target, redrawn until non-empty: bool (H, W), inside ``target``.

    Slivers are poor training signal, so draws continue until one reaches MIN_AREA of the image
    (or the target's size); after PERLIN_TRIES the largest non-empty draw is kept. If every draw
    missed: the upper half of one noise draw's values inside the target, which keeps a Perlin
    shape and always holds a pixel.
    """
    if not target.any():
        raise ValueError("the target area is empty")
    wanted = min(math.ceil(MIN_AREA * target.size), int(target.sum()))
    best = None
    for _ in range(PERLIN_TRIES):
        m = perlin_mask(target.shape, rng, threshold, scales) & target
        area = int(m.sum())
        if area >= wanted:
            return m
        if area and (best is None or area > best.sum()):
            best = m
    if best is not None:
        return best
    noise = random_perlin_noise(target.shape, rng, scales)
    return target & (noise >= np.median(noise[target]))


def shuffle_grid(image: np.ndarray, grid: int, rng: np.random.Generator) -> np.ndarray:
    """Cuts (H, W, C) into grid x grid equal cells and reassembles them in a random order.

    When H or W is not a multiple of ``grid`` the remainder rows/columns stay where they are.
    """
    h, w, c = image.shape
    ch, cw = h // grid, w // grid
    if ch == 0 or cw == 0:
        raise ValueError(f"a {grid}x{grid} grid does not fit a {h}x{w} image")
    body = image[:grid * ch, :grid * cw]
    cells = body.reshape(grid, ch, grid, cw, c).transpose(0, 2, 1, 3, 4).reshape(grid * grid, ch, cw, c)
    cells = cells[rng.permutation(grid * grid)]
    out = image.copy()
    out[:grid * ch, :grid * cw] = (cells.reshape(grid, grid, ch, cw, c).transpose(0, 2, 1, 3, 4)
                                   .reshape(grid * ch, grid * cw, c))
    return out


def make_simulated(normal: np.ndarray, source: np.ndarray, target: np.ndarray, beta: float,
                   threshold: float, rng: np.random.Generator,
                   scales: tuple[int, int] = (0, 6)) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 6 with a given anomaly source A (already augmented).

    normal, source: uint8 (H, W, 3); target: bool (H, W), non-empty; beta in [0, 1).
    Returns (uint8 (H, W, 3), bool (H, W)): the image and the non-empty mask of its changed pixels,
    inside ``target``.
    """
    for _ in range(BLEND_TRIES):
        m = perlin_in_target(target, rng, threshold, scales)
        image, changed = blend(normal, source, m, beta)
        if changed.any():
            return image, changed
    return inverted_patch(normal, m)


def make_heterologous(normal: np.ndarray, texture: np.ndarray, target: np.ndarray, beta: float,
                      threshold: float, rng: np.random.Generator, *, aug1_ops: int = 2, aug1_prob: float = 1.0,
                      scales: tuple[int, int] = (0, 6)) -> tuple[np.ndarray, np.ndarray]:
    """HEA: A = Aug1(texture). texture: uint8 of the normal's shape."""
    return make_simulated(normal, aug1(texture, rng, aug1_ops, aug1_prob), target, beta, threshold, rng, scales)


def make_homologous(normal: np.ndarray, target: np.ndarray, beta: float, threshold: float, grid: int,
                    rng: np.random.Generator, *, aug1_ops: int = 2, aug1_prob: float = 1.0,
                    scales: tuple[int, int] = (0, 6)) -> tuple[np.ndarray, np.ndarray]:
    """HOA: A = Aug1(normal) with its grid x grid cells shuffled."""
    source = shuffle_grid(aug1(normal, rng, aug1_ops, aug1_prob), grid, rng)
    return make_simulated(normal, source, target, beta, threshold, rng, scales)
