"""Extended anomalies (EA, Sec. 3.4, Eq. 4): seen defects, recoloured and moved onto normal images.

    E = (1 - M) * N + (1 - beta) * C + beta * (M * N),   C = M * R

R is the seen anomaly image after Aug1 (colour) and Aug2 (rotate/shear/shift, the same map for
its defect mask); M is the moved defect mask clipped to the target area.

Masks mark exactly the pixels that the blend changed: a pixel of M whose blended value rounds
back to the normal value (the anomaly source equals the normal image there, or beta is so close
to 1 that the difference vanishes in uint8) is dropped from the mask, because nothing there is
anomalous. If that empties the mask, the sample is redrawn; after a few tries an inverted patch
(255 - N, beta 0, which always differs) is written inside the target mask.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from prn.anomalies.augment import aug1, sample_aug2, warp_image, warp_mask

AUG2_TRIES = 10  # Aug2 redraws before the fallback that moves the defect into the target area
BLEND_TRIES = 5  # redraws when a blend changed no pixel
MIN_AREA = 0.001  # ours: overlaps below this share of the image (65 px at 256) are redrawn when possible


def blend(normal: np.ndarray, source: np.ndarray, mask: np.ndarray, beta: float) -> tuple[np.ndarray, np.ndarray]:
    """Eq. 4/6: (1 - M) N + (1 - beta) M A + beta M N, rounded to uint8.

    normal, source: uint8 (H, W, 3); mask: bool (H, W); beta in [0, 1).
    Returns (uint8 (H, W, 3), bool (H, W)): the image, and ``mask`` reduced to the pixels whose
    value changed in any channel.
    """
    n = normal.astype(np.float32)
    mixed = (1.0 - beta) * source.astype(np.float32) + beta * n
    out = np.where(mask[..., None], np.clip(np.rint(mixed), 0, 255), n).astype(np.uint8)
    changed = mask & (out != normal).any(axis=-1)
    return out, changed


def inverted_patch(normal: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Last-resort anomaly: 255 - N inside ``mask``. Every masked pixel changes (255 is odd)."""
    out = normal.copy()
    out[mask] = 255 - normal[mask]
    return out, mask.copy()


def _shift(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Integer translation with zero fill (rows down by dy, columns right by dx); exact, unlike a
    resampling affine, so the pixel moved onto the target lands exactly there."""
    out = np.zeros_like(array)
    h, w = array.shape[:2]
    src = array[max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
    out[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
    return out


def place_on_target(image: np.ndarray, mask: np.ndarray, target: np.ndarray,
                    rng: np.random.Generator, max_angle: float = 90.0,
                    min_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Aug2 until the moved defect overlaps the target area; then the fallback: shift the defect
    pixel nearest the defect's centroid onto a random target pixel (always overlaps).

    Draws go on until the overlap reaches MIN_AREA of the image (or the defect's or target's
    size, when smaller); after AUG2_TRIES the largest overlap is kept.
    image: uint8 (H, W, 3) (already Aug1'd); mask: bool (H, W), non-empty; target: bool (H, W),
    non-empty. Returns R (uint8 (H, W, 3)) and its mask (bool (H, W)).
    """
    cy, cx = ndimage.center_of_mass(mask)
    limit, defect_area = min(math.ceil(MIN_AREA * mask.size), int(target.sum())), int(mask.sum())
    best, best_area = None, 0
    for _ in range(AUG2_TRIES):
        params = sample_aug2(rng, mask.shape, center=(cx, cy), max_angle=max_angle, min_scale=min_scale)
        # a shrunk defect is wanted at its shrunk size (scale 1: the paper's rule as before)
        wanted = min(limit, int(defect_area * params.scale ** 2))
        moved_mask = warp_mask(mask, params)
        area = int((moved_mask & target).sum())
        if area > best_area:
            best, best_area = (params, moved_mask), area
        if area >= wanted:
            break
    if best is not None:  # the image is warped only for the chosen map
        return warp_image(image, best[0]), best[1]
    ys, xs = np.nonzero(mask)
    k = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    ty, tx = np.nonzero(target)
    j = int(rng.integers(len(ty)))
    dy, dx = int(ty[j] - ys[k]), int(tx[j] - xs[k])
    return _shift(image, dy, dx), _shift(mask, dy, dx)


def make_extended(normal: np.ndarray, seen_image: np.ndarray, seen_mask: np.ndarray, target: np.ndarray,
                  beta: float, rng: np.random.Generator, *, aug1_ops: int = 2, aug1_prob: float = 1.0,
                  max_angle: float = 90.0, clip_to_target: bool = True,
                  min_scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One extended anomaly (Eq. 4).

    normal, seen_image: uint8 (H, W, 3); seen_mask: bool (H, W) with at least one pixel;
    target: bool (H, W) with at least one pixel; beta: opacity in [0, 1). aug1_ops/aug1_prob:
    Aug1's settings; max_angle: Aug2's rotation range; min_scale < 1: Aug2 also shrinks the defect
    by a factor in [min_scale, 1] (ours, ``ea_scale_min``). clip_to_target False keeps the moved
    defect whole (the target area only decides where it lands), so a crack stays a crack.
    Returns (uint8 (H, W, 3), bool (H, W)): the image and the mask of exactly its changed pixels,
    non-empty, and inside ``target`` when clip_to_target.
    """
    if not seen_mask.any():
        raise ValueError("the seen anomaly's mask is empty: it has no defect region to extend")
    if not target.any():
        raise ValueError("the target area is empty")
    for _ in range(BLEND_TRIES):
        # Aug1 sees the whole seen image, so equalize/autocontrast use its full histogram.
        recoloured = aug1(seen_image, rng, aug1_ops, aug1_prob)
        moved, moved_mask = place_on_target(recoloured, seen_mask, target, rng, max_angle, min_scale)
        m = moved_mask & target if clip_to_target else moved_mask
        image, changed = blend(normal, moved, m, beta)
        if changed.any():
            return image, changed
    return inverted_patch(normal, moved_mask & target if (moved_mask & target).any() else moved_mask)
