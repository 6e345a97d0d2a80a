"""Samples -> resized arrays and a torch Dataset of model-ready tensors.

Images are resized to H x W (``size``: an int S for S x S, as in the paper, or (H, W)) by the one
pre-process (``prn.preprocess``: Pillow's bilinear filter, antialiased when it shrinks), masks
with nearest neighbour so they stay binary. A non-square image resized to a square is stretched,
as in the paper.

    >>> ds = ImageDataset(split.test, size=256)
    >>> item = ds[0]   # {"image": float32 (3, 256, 256) in [0, 1], "mask": float32 (1, 256, 256), ...}
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from prn.data.io import DEFAULT_MAX_PIXELS, image_hw, read_mask
from prn.data.sample import Sample
from prn.preprocess import OFF, Detail, as_hw, batches_of, read_resized, to_tensor


def original_hw(sample: Sample) -> tuple[int, int]:
    """(height, width) of the sample's image on disk, from its header."""
    return image_hw(sample.image_path)


def load_sample(sample: Sample, size: int | tuple[int, int], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                detail: Detail = OFF) -> tuple[np.ndarray, np.ndarray]:
    """Read and resize one sample to ``size`` (S or (H, W)): (uint8 (H, W, 3), bool (H, W)); the
    mask is all False when the sample has none. The mask must have the image's size (else DataError).
    detail: the pre-process's filter before the resize (``cfg.model.detail``)."""
    h, w = as_hw(size)
    resized, full_hw = read_resized(sample.image_path, (h, w), max_pixels, detail)
    if sample.mask_path is None:
        return resized, np.zeros((h, w), dtype=bool)
    mask = read_mask(sample.mask_path, full_hw, max_pixels, image_path=sample.image_path)
    small = Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST)
    return resized, np.array(small, dtype=bool)


class ImageDataset(Dataset):
    """Samples as model inputs: {"image": float32 (3, H, W) in [0, 1], "mask": float32 (1, H, W)
    in {0, 1}, "label": int, "index": int (position in samples)}. size: S or (H, W)."""

    def __init__(self, samples: list[Sample], size: int | tuple[int, int],
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, detail: Detail = OFF):
        self.samples = list(samples)
        self.size = as_hw(size)
        self.max_pixels = max_pixels
        self.detail = detail

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        sample = self.samples[i]
        image, mask = load_sample(sample, self.size, self.max_pixels, self.detail)
        return {
            "image": to_tensor(image),
            "mask": torch.from_numpy(mask).to(torch.float32)[None],
            "label": int(sample.label),
            "index": i,
        }


def load_arrays(samples: list[Sample], size: int | tuple[int, int], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                detail: Detail = OFF) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``load_sample`` of every sample: (images uint8 (H, W, 3), masks bool (H, W)), in order."""
    pairs = [load_sample(s, size, max_pixels, detail) for s in samples]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def boxes_of(mask: np.ndarray) -> np.ndarray:
    """bool (H, W): the bounding box of each 8-connected region of ``mask``, filled (a box
    annotation made from a pixel one)."""
    out = np.zeros_like(mask, dtype=bool)
    labels, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    for rows, cols in ndimage.find_objects(labels):
        out[rows, cols] = True
    return out


def load_training_arrays(cfg, split):
    """The normal training images of ``split`` (uint8 arrays at the model's input size) and its
    seen anomalies as (image, mask, annotation) triples (``Sample.annotation``; with
    cfg.data.seen_annotation "box" or "label" each mask is made a box or dropped). cfg: a ``PRNConfig``."""
    normals, _ = load_arrays(split.train_normal, cfg.model.input_hw, cfg.data.max_image_pixels, cfg.model.detail)
    return normals, load_seen_arrays(cfg, split)


def load_seen_arrays(cfg, split) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """The seen anomalies of ``split`` as ``load_training_arrays`` gives them: (image, mask,
    annotation) triples, each mask made a box or dropped as cfg.data.seen_annotation says."""
    images, masks = load_arrays(split.train_anomalous, cfg.model.input_hw, cfg.data.max_image_pixels, cfg.model.detail)
    seen = []
    for sample, image, mask in zip(split.train_anomalous, images, masks):
        annotation = sample.annotation
        if cfg.data.seen_annotation == "label" or (cfg.data.seen_annotation == "box" and annotation == "label"):
            mask, annotation = np.zeros_like(mask), "label"
        elif cfg.data.seen_annotation == "box" or annotation == "box":
            # a box file is boxes already (each rectangle stays; touching ones join); a painted mask
            # that a retrain takes as a box (prn fit --from --added-annotation box) becomes one here
            mask, annotation = boxes_of(mask), "box"
        seen.append((image, mask, annotation))
    return seen


def small_seen_defects(seen: list[tuple[np.ndarray, np.ndarray, str]], pixels: int) -> dict:
    """How many of the seen defects with a pixel mask (``load_seen_arrays``' triples, masks at the
    model's input size) cover fewer than ``pixels`` pixels of the input: {"masks", "small",
    "smallest" (pixels, None without masks), "pixels"}. Boxes and labels say nothing of a defect's
    size and are not counted. Why: the fit says so when the line's defects are this small, because
    the map barely draws them (README, "Small defects")."""
    areas = [int(mask.sum()) for _, mask, annotation in seen if annotation == "mask"]
    return {"masks": len(areas), "small": sum(a < pixels for a in areas),
            "smallest": min(areas) if areas else None, "pixels": pixels}


@dataclass
class ValidationFold:
    """The held-out fold of the training data in memory: its samples, model inputs float32
    (N, 3, H, W), masks bool (N, H, W) and labels int64 (N,)."""
    samples: list
    images: torch.Tensor
    masks: np.ndarray
    labels: np.ndarray


def load_validation(cfg, split) -> ValidationFold | None:
    """The validation fold of ``split`` (``val_normal`` + ``val_anomalous``), or None when it holds none."""
    samples = split.val_normal + split.val_anomalous
    if not samples:
        return None
    images, masks = load_arrays(samples, cfg.model.input_hw, cfg.data.max_image_pixels, cfg.model.detail)
    return ValidationFold(samples, torch.cat(list(batches_of(images, len(images)))), np.stack(masks),
                          np.array([s.label for s in samples], dtype=np.int64))
