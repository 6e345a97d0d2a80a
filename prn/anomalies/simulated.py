"""Simulated anomalies (SA, Sec. 3.4 and A.1, Eq. 6): Perlin-shaped patches of a foreign source.

    S = (1 - M) * N + (1 - beta) * (M * A) + beta * (M * N),   M = Perlin mask & target area

- heterologous (HEA): A = Aug1(texture) (DTD or procedural);
- homologous (HOA): A = Aug1(normal), cut into a g x g grid whose cells are shuffled.

As for extended anomalies, the mask keeps only pixels the blend changed (see extended.py).
Ours: when strokes are on, a share of simulated anomalies (``stroke_share``) takes a thin curved
stroke as its mask instead of Perlin blobs, the shape of a scratch or a crack, which Perlin noise
never draws; ``strokes: auto`` turns them on when the seen defects are thin (``stroke_decision``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from prn.anomalies.augment import aug1
from prn.anomalies.extended import BLEND_TRIES, MIN_AREA, blend, inverted_patch
from prn.anomalies.perlin import perlin_mask, random_perlin_noise

PERLIN_TRIES = 10  # Perlin redraws when the thresholded noise misses the target area


def drawn_in_target(draw: Callable[[], np.ndarray], target: np.ndarray) -> np.ndarray | None:
    """Masks from ``draw()`` clipped to ``target``, drawn until one reaches MIN_AREA of the image
    (or the target's size): slivers are poor training signal. After PERLIN_TRIES the largest
    non-empty draw; None when every draw missed the target."""
    if not target.any():
        raise ValueError("the target area is empty")
    wanted = min(math.ceil(MIN_AREA * target.size), int(target.sum()))
    best = None
    for _ in range(PERLIN_TRIES):
        m = draw() & target
        area = int(m.sum())
        if area >= wanted:
            return m
        if area and (best is None or area > best.sum()):
            best = m
    return best


def perlin_in_target(target: np.ndarray, rng: np.random.Generator, threshold: float,
                     scales: tuple[int, int] = (0, 6)) -> np.ndarray:
    """Perlin mask & target, redrawn until large enough (``drawn_in_target``): bool (H, W), inside
    ``target``. If every draw missed: the upper half of one noise draw's values inside the target,
    which keeps a Perlin shape and always holds a pixel.
    """
    m = drawn_in_target(lambda: perlin_mask(target.shape, rng, threshold, scales), target)
    if m is not None:
        return m
    noise = random_perlin_noise(target.shape, rng, scales)
    return target & (noise >= np.median(noise[target]))


STROKE_SEGMENTS = 6  # a stroke is a polyline of this many segments, its heading turning between them
STROKE_TURN = 0.35  # radians: the sd of the heading's turn from one segment to the next
STROKE_LENGTH = (0.3, 1.0)  # the stroke's length, a share of the target area's longer side


def stroke_in_target(target: np.ndarray, rng: np.random.Generator, width: tuple[int, int] = (1, 4)) -> np.ndarray:
    """A thin curved stroke inside ``target``: bool (H, W), non-empty.

    A polyline from a random target pixel, its heading turning a little at each segment, drawn
    ``width`` pixels wide (uniform in the range, inclusive) by PIL and clipped to the target.
    Drawn as Perlin masks are, until one is large enough (``drawn_in_target``). Every draw keeps
    at least its starting pixel, a target pixel; the Perlin mask at the end is a guard, not a path.
    """
    if not target.any():
        raise ValueError("the target area is empty")
    h, w = target.shape
    ys, xs = np.nonzero(target)
    side = max(int(ys.max() - ys.min()), int(xs.max() - xs.min())) + 1

    def draw() -> np.ndarray:
        k = int(rng.integers(len(ys)))
        y, x = float(ys[k]), float(xs[k])
        step = rng.uniform(*STROKE_LENGTH) * side / STROKE_SEGMENTS
        heading = rng.uniform(0.0, 2.0 * np.pi)
        points = [(x, y)]
        for _ in range(STROKE_SEGMENTS):
            heading += rng.normal(0.0, STROKE_TURN)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            points.append((x, y))
        canvas = Image.new("1", (w, h))
        ImageDraw.Draw(canvas).line(points, fill=1, width=int(rng.integers(width[0], width[1] + 1)), joint="curve")
        return np.asarray(canvas, dtype=bool)

    m = drawn_in_target(draw, target)
    return m if m is not None else perlin_in_target(target, rng, 0.5)


def elongation(mask: np.ndarray) -> float | None:
    """How thin a defect is: the ratio of the long to the short axis (square roots of the pixel
    coordinates' covariance eigenvalues, each pixel counted as a unit square) of the mask's largest
    connected part. 1 for a disc or a square, about length / width for a line; None for an empty mask."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    # a pixel is a unit square (variance 1/12 on each axis): a single pixel or a 1-px line stays finite
    cov = np.cov(np.stack([ys, xs]).astype(np.float64), bias=True) + np.eye(2) / 12.0
    small, large = np.linalg.eigvalsh(cov)
    return float(math.sqrt(large / small))


def stroke_decision(mode: str, seen: Sequence[tuple[np.ndarray, np.ndarray, str]], gate: float) -> dict:
    """Whether strokes are drawn: ``{"used": bool, "why": str}``, with ``"elongation"`` (the median
    over the seen defects' masks) when ``mode`` is "auto". Boxes and labels say nothing of a
    defect's shape and are not counted; with no mask, auto leaves strokes off."""
    if mode != "auto":
        return {"used": mode == "on", "why": f"strokes: {mode}"}
    values = [e for _, mask, annotation in seen if annotation == "mask" and (e := elongation(mask)) is not None]
    if not values:
        return {"used": False, "why": "no seen defect has a mask to judge its shape by"}
    median = float(np.median(values))
    used = median >= gate
    return {"used": used, "elongation": median, "n": len(values),
            "why": (f"the seen defects are {'thin' if used else 'compact'}: median elongation {median:.1f} "
                    f"{'>=' if used else '<'} {gate:g} over {len(values)} masks")}


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
                   scales: tuple[int, int] = (0, 6), stroke_share: float = 0.0,
                   stroke_width: tuple[int, int] = (1, 4)) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 6 with a given anomaly source A (already augmented).

    normal, source: uint8 (H, W, 3); target: bool (H, W), non-empty; beta in [0, 1).
    Returns (uint8 (H, W, 3), bool (H, W)): the image and the non-empty mask of its changed pixels,
    inside ``target``.
    """
    # no draw when strokes are off: runs from before them replay exactly
    stroke = stroke_share > 0 and rng.random() < stroke_share
    for _ in range(BLEND_TRIES):
        m = stroke_in_target(target, rng, stroke_width) if stroke else perlin_in_target(target, rng, threshold, scales)
        image, changed = blend(normal, source, m, beta)
        if changed.any():
            return image, changed
    return inverted_patch(normal, m)


def make_heterologous(normal: np.ndarray, texture: np.ndarray, target: np.ndarray, beta: float,
                      threshold: float, rng: np.random.Generator, *, aug1_ops: int = 2, aug1_prob: float = 1.0,
                      scales: tuple[int, int] = (0, 6), **strokes) -> tuple[np.ndarray, np.ndarray]:
    """HEA: A = Aug1(texture). texture: uint8 of the normal's shape. strokes: make_simulated's."""
    return make_simulated(normal, aug1(texture, rng, aug1_ops, aug1_prob), target, beta, threshold, rng, scales, **strokes)


def make_homologous(normal: np.ndarray, target: np.ndarray, beta: float, threshold: float, grid: int,
                    rng: np.random.Generator, *, aug1_ops: int = 2, aug1_prob: float = 1.0,
                    scales: tuple[int, int] = (0, 6), **strokes) -> tuple[np.ndarray, np.ndarray]:
    """HOA: A = Aug1(normal) with its grid x grid cells shuffled. strokes: make_simulated's."""
    source = shuffle_grid(aug1(normal, rng, aug1_ops, aug1_prob), grid, rng)
    return make_simulated(normal, source, target, beta, threshold, rng, scales, **strokes)
