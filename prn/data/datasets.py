"""Samples -> resized arrays and a torch Dataset of model-ready tensors.

Images are resized to H x W (``size``: an int S for S x S, as in the paper, or (H, W)) with PIL's
bilinear filter (PIL antialiases when it shrinks), masks with nearest neighbour so they stay
binary. A non-square image resized to a square is stretched, as in the paper.

    >>> ds = ImageDataset(split.test, size=256)
    >>> item = ds[0]   # {"image": float32 (3, 256, 256) in [0, 1], "mask": float32 (1, 256, 256), ...}
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from prn.data.io import DEFAULT_MAX_PIXELS, image_hw, read_image, read_mask
from prn.data.sample import Sample


def original_hw(sample: Sample) -> tuple[int, int]:
    """(height, width) of the sample's image on disk, from its header."""
    return image_hw(sample.image_path)


def as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    """An int S -> (S, S); (H, W) -> (H, W)."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (H, W, 3), PIL bilinear (antialiased when it shrinks)."""
    h, w = as_hw(size)
    if image.shape[:2] == (h, w):
        return image
    return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [0, 1], a plain tensor."""
    return TF.to_dtype(TF.to_image(image), torch.float32, scale=True).as_subclass(torch.Tensor)


def load_sample(sample: Sample, size: int | tuple[int, int],
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Read and resize one sample to ``size`` (S or (H, W)): (uint8 (H, W, 3), bool (H, W)); the
    mask is all False when the sample has none. The mask must have the image's size (else DataError)."""
    image = read_image(sample.image_path, max_pixels)
    h, w = as_hw(size)
    resized = resize_image(image, (h, w))
    if sample.mask_path is None:
        return resized, np.zeros((h, w), dtype=bool)
    mask = read_mask(sample.mask_path, image.shape[:2], max_pixels, image_path=sample.image_path)
    small = Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST)
    return resized, np.array(small, dtype=bool)


class ImageDataset(Dataset):
    """Samples as model inputs: {"image": float32 (3, H, W) in [0, 1], "mask": float32 (1, H, W)
    in {0, 1}, "label": int, "index": int (position in samples)}. size: S or (H, W)."""

    def __init__(self, samples: list[Sample], size: int | tuple[int, int],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.samples = list(samples)
        self.size = as_hw(size)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        image, mask = load_sample(sample, self.size, self.max_pixels)
        return {
            "image": to_tensor(image),
            "mask": torch.from_numpy(mask).to(torch.float32)[None],
            "label": int(sample.label),
            "index": i,
        }
