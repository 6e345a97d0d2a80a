"""Samples -> resized arrays and a torch Dataset of model-ready tensors.

Images are resized to S x S with PIL's bilinear filter (PIL antialiases when it shrinks), masks
with nearest neighbour so they stay binary; non-square images are stretched, as in the paper.

    >>> ds = ImageDataset(split.test, image_size=256)
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


def load_sample(sample: Sample, image_size: int,
                max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Read and resize one sample: (uint8 (S, S, 3), bool (S, S)); the mask is all False when the
    sample has none. The mask must have the image's size (else DataError)."""
    image = read_image(sample.image_path, max_pixels)
    size = (image_size, image_size)
    resized = np.array(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
    if sample.mask_path is None:
        return resized, np.zeros(size, dtype=bool)
    mask = read_mask(sample.mask_path, image.shape[:2], max_pixels, image_path=sample.image_path)
    small = Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)
    return resized, np.array(small, dtype=bool)


class ImageDataset(Dataset):
    """Samples as model inputs: {"image": float32 (3, S, S) in [0, 1], "mask": float32 (1, S, S)
    in {0, 1}, "label": int, "index": int (position in samples)}."""

    def __init__(self, samples: list[Sample], image_size: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS):
        self.samples = list(samples)
        self.image_size = image_size
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        image, mask = load_sample(sample, self.image_size, self.max_pixels)
        tensor = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        return {
            "image": tensor.as_subclass(torch.Tensor),  # a plain tensor, not a tv_tensors.Image
            "mask": torch.from_numpy(mask).to(torch.float32)[None],
            "label": int(sample.label),
            "index": i,
        }
