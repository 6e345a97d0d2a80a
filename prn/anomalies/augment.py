"""The two augmentations of anomaly generation (Sec. 3.4, Fig. 5).

- Aug1 (colour): two distinct random operations from {equalize, solarize, posterize, sharpness,
  autocontrast, invert, gamma-contrast}, each with a random strength.
- Aug2 (space): one random affine map {rotate, shear, shift}, applied identically to an image
  (bilinear) and its mask (nearest).

Both run torchvision.transforms.v2.functional on uint8 tensors; parameters come from the
``numpy.random.Generator`` passed in, so a seed fixes the result.

    >>> rng = np.random.default_rng(0)
    >>> aug1(np.zeros((32, 32, 3), np.uint8), rng).dtype
    dtype('uint8')
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

AUG1_OPS = ("equalize", "solarize", "posterize", "sharpness", "autocontrast", "invert", "gamma")

# Aug2 ranges (the paper gives none): rotations and shears wide enough to vary a defect's shape.
MAX_ANGLE = 90.0   # degrees
MAX_SHEAR = 20.0   # degrees, per axis


def _to_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.permute(1, 2, 0).numpy())


def sample_aug1(rng: np.random.Generator, n_ops: int = 2, prob: float = 1.0) -> list[tuple[str, float]]:
    """Up to ``n_ops`` distinct Aug1 operations with their strengths, e.g. [("posterize", 3),
    ("gamma", 1.4)]; each drawn operation is kept with probability ``prob`` (1: always n_ops,
    the paper's two; below 1 some defects keep the look they had)."""
    names = rng.choice(len(AUG1_OPS), size=n_ops, replace=False)
    keep = rng.random(n_ops) < prob
    ops = []
    for i in names[keep]:
        name = AUG1_OPS[int(i)]
        if name == "solarize":
            strength = float(rng.integers(32, 224))         # threshold on 0..255
        elif name == "posterize":
            strength = float(rng.integers(2, 7))            # bits kept
        elif name == "sharpness":
            strength = float(rng.uniform(0.1, 4.0))         # 1 is identity
        elif name == "gamma":
            strength = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))  # DRAEM's (0.5, 2)
        else:
            strength = 0.0                                   # equalize, autocontrast, invert
        ops.append((name, strength))
    return ops


def _apply_op(t: torch.Tensor, name: str, strength: float) -> torch.Tensor:
    if name == "equalize":
        return F.equalize(t)
    if name == "solarize":
        return F.solarize(t, threshold=strength)
    if name == "posterize":
        return F.posterize(t, bits=int(strength))
    if name == "sharpness":
        return F.adjust_sharpness(t, sharpness_factor=strength)
    if name == "autocontrast":
        return F.autocontrast(t)
    if name == "invert":
        return F.invert(t)
    if name == "gamma":
        return F.adjust_gamma(t, gamma=strength)
    raise ValueError(f"unknown Aug1 operation {name!r}; expected one of {AUG1_OPS}")


def apply_aug1(image: np.ndarray, ops: list[tuple[str, float]]) -> np.ndarray:
    """Applies ``ops`` in order to a uint8 (H, W, 3) image; returns uint8 (H, W, 3)."""
    t = _to_tensor(image)
    for name, strength in ops:
        t = _apply_op(t, name, strength)
    return _to_numpy(t)


def aug1(image: np.ndarray, rng: np.random.Generator, n_ops: int = 2, prob: float = 1.0) -> np.ndarray:
    """Aug1: random distinct colour operations (``sample_aug1``). uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    return apply_aug1(image, sample_aug1(rng, n_ops, prob))


@dataclass(frozen=True)
class Affine:
    """One Aug2 map: rotation (degrees) and shear (degrees, x and y) about ``center`` (x, y as
    pixel indices: column, row), then a shift ``translate`` (x, y in pixels)."""

    angle: float
    shear: tuple[float, float]
    translate: tuple[float, float]
    center: tuple[float, float]
    scale: float = 1.0  # about ``center``; Aug2 of the paper keeps 1 (``ea_scale_min`` draws below it)


def sample_aug2(rng: np.random.Generator, hw: tuple[int, int],
                center: tuple[float, float] | None = None, max_angle: float = MAX_ANGLE,
                min_scale: float = 1.0) -> Affine:
    """A random Aug2 map for an (H, W) image. ``center`` (x, y) is the pivot of the rotation
    (within +-max_angle degrees), shear and scale (default: the image centre); the shift moves it
    to a uniformly random point of the image, so a defect can land anywhere. min_scale < 1 shrinks
    by a factor drawn uniformly in [min_scale, 1] (drawn last, so at 1 the maps are the paper's,
    draw for draw)."""
    h, w = hw
    cx, cy = center if center is not None else ((w - 1) / 2, (h - 1) / 2)
    dest_x, dest_y = rng.uniform(0, w - 1), rng.uniform(0, h - 1)
    params = Affine(angle=float(rng.uniform(-max_angle, max_angle)),
                    shear=(float(rng.uniform(-MAX_SHEAR, MAX_SHEAR)), float(rng.uniform(-MAX_SHEAR, MAX_SHEAR))),
                    translate=(float(dest_x - cx), float(dest_y - cy)),
                    center=(float(cx), float(cy)))
    if min_scale < 1:
        params = replace(params, scale=float(rng.uniform(min_scale, 1.0)))
    return params


def _affine_kwargs(params: Affine, scale: float | None = None) -> dict:
    return {"angle": params.angle, "translate": list(params.translate),
            "scale": params.scale if scale is None else scale,
            "shear": list(params.shear),
            # torchvision puts pixel i's centre at coordinate i + 0.5
            "center": [params.center[0] + 0.5, params.center[1] + 0.5]}


def warp_image(image: np.ndarray, params: Affine) -> np.ndarray:
    """One affine map on a uint8 (H, W, 3) image, bilinear, zero fill: uint8 (H, W, 3)."""
    kwargs = _affine_kwargs(params)
    return _to_numpy(F.affine(_to_tensor(image), interpolation=InterpolationMode.BILINEAR, fill=0, **kwargs))


def warp_mask(mask: np.ndarray, params: Affine) -> np.ndarray:
    """One affine map on a bool (H, W) mask, nearest (so it stays binary): bool (H, W)."""
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None]
    m = F.affine(m, interpolation=InterpolationMode.NEAREST, fill=0, **_affine_kwargs(params))
    return m[0].numpy().astype(bool)


def apply_aug2(image: np.ndarray, mask: np.ndarray, params: Affine) -> tuple[np.ndarray, np.ndarray]:
    """The same affine map on a uint8 (H, W, 3) image and its bool (H, W) mask."""
    return warp_image(image, params), warp_mask(mask, params)


def aug2(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
         center: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Aug2: a random rotate/shear/shift, the same for the image and its mask."""
    return apply_aug2(image, mask, sample_aug2(rng, mask.shape, center))


# Mild augmentation of a seen anomaly shown as itself (ours): the defect keeps its look; only
# what a camera on a line varies (pose, position, exposure) changes a little.
MILD_ANGLE = 10.0      # degrees
MILD_SCALE = (0.9, 1.1)
MILD_SHIFT = 0.05      # share of the side
MILD_BRIGHTNESS = 0.1  # +- share


def mild_augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, a small rotation, scale and shift (the same for image and mask) and a small
    brightness change: uint8 (H, W, 3), bool (H, W) -> same. When the move would push the whole
    defect out of the picture, only the flips and brightness are applied."""
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        image, mask = image[::-1], mask[::-1]
    h, w = mask.shape
    params = Affine(angle=float(rng.uniform(-MILD_ANGLE, MILD_ANGLE)), shear=(0.0, 0.0),
                    translate=(float(rng.uniform(-MILD_SHIFT, MILD_SHIFT) * w),
                               float(rng.uniform(-MILD_SHIFT, MILD_SHIFT) * h)),
                    center=((w - 1) / 2, (h - 1) / 2))
    scale = float(rng.uniform(*MILD_SCALE))
    kwargs = _affine_kwargs(params, scale)
    # Border pixels uncovered by the move take the image's mean colour, not black.
    fill = [float(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0)]
    moved = _to_numpy(F.affine(_to_tensor(image), interpolation=InterpolationMode.BILINEAR, fill=fill, **kwargs))
    m = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None]
    moved_mask = F.affine(m, interpolation=InterpolationMode.NEAREST, fill=0, **kwargs)[0].numpy().astype(bool)
    if moved_mask.any():
        image, mask = moved, moved_mask
    factor = 1.0 + float(rng.uniform(-MILD_BRIGHTNESS, MILD_BRIGHTNESS))
    image = np.clip(np.asarray(image, np.float32) * factor + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)
