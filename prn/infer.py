"""Inference over a list of samples (test, calibration): anomaly maps and image scores, timed.

Images are read and turned into model inputs by ``prn.data.datasets.ImageDataset`` (the one
pre-process, ``prn.preprocess``) and run through ``prn.pipeline.forward_model``, as everywhere.
A model here is any ``nn.Module`` whose eval-mode ``forward(x[B,3,S,S] in [0,1])`` returns
``{"anomaly_map": (B,1,S,S), "pred_score": (B,)}`` (PRN, the prototype map and PatchCore do).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prn.data.datasets import ImageDataset, ValidationFold
from prn.data.sample import Sample
from prn.deploy.drift import appearance
from prn.metrics import image_auroc, pixel_ap, pixel_auroc
from prn.pipeline import forward_model
from prn.preprocess import OFF, Detail


@dataclass
class Predictions:
    """Per-image outputs at the model's input size H x W.

    scores: float64 (N,); maps: float32 (N,H,W); masks: bool (N,H,W); labels: int (N,);
    seconds_per_image: model time (forward pass, synchronised on CUDA) divided by N;
    appearance: float64 (N, 2), each input's brightness and detail (``prn.deploy.drift``), which
    calibration keeps of the good images.
    """

    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    seconds_per_image: float
    appearance: np.ndarray | None = None

    @property
    def pixel_exact(self) -> np.ndarray:
        """bool (N,): the images whose masks are pixel truth (good ones, and defects with a mask,
        not a box or a label alone): the pixel metrics are taken over these."""
        return np.array([s.pixel_exact for s in self.samples], dtype=bool)


@torch.no_grad()
def predict_samples(model: torch.nn.Module, samples: list[Sample], size: int | tuple[int, int], *,
                    batch_size: int = 16, device: torch.device | str = "cpu",
                    max_pixels: int = 50_000_000, num_workers: int = 0,
                    progress: bool = False, precision: str = "32", detail: Detail = OFF) -> Predictions:
    """precision: the run's training precision; the forward pass runs under its autocast
    (prn.precision.inference_autocast), maps and scores come out float32 whatever it is.
    detail: the pre-process's filter before the resize (``cfg.model.detail``)."""
    device = torch.device(device)
    model.eval().to(device)
    dataset = ImageDataset(samples, size, max_pixels, detail)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    n = len(samples)
    scores = np.zeros(n, dtype=np.float64)
    maps = np.zeros((n, *dataset.size), dtype=np.float32)
    masks = np.zeros((n, *dataset.size), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    looks = np.zeros((n, 2), dtype=np.float64)
    model_seconds = 0.0
    for batch in tqdm(loader, desc="inference", disable=not progress, leave=False):
        idx = batch["index"].numpy()
        t0 = time.perf_counter()
        # forward_model returns numpy arrays, so the time includes the wait for a CUDA device
        scores[idx], maps[idx] = forward_model(model, batch["image"], device, precision)
        model_seconds += time.perf_counter() - t0
        masks[idx] = batch["mask"][:, 0].numpy() > 0.5
        labels[idx] = batch["label"].numpy()
        looks[idx] = appearance(batch["image"])
    return Predictions(samples, scores, maps, masks, labels, model_seconds / max(n, 1), looks)


@torch.no_grad()
def validate(model: torch.nn.Module, val: ValidationFold, device: torch.device, batch_size: int,
             precision: str = "32") -> tuple[dict, Predictions]:
    """Image AUROC, pixel AUROC and pixel AP on the validation fold in memory (nan where a class
    is missing), and the fold's outputs, from which ``fit`` calibrates the model it keeps. The
    model's train/eval mode is restored afterwards."""
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    outputs = [forward_model(model, val.images[i:i + batch_size], device, precision)
               for i in range(0, len(val.images), batch_size)]
    model.train(was_training)
    scores, maps = (np.concatenate(parts) for parts in zip(*outputs))
    preds = Predictions(val.samples, scores, maps, val.masks, val.labels,
                        (time.perf_counter() - t0) / len(val.samples), appearance(val.images))
    exact = preds.pixel_exact
    masks, maps = val.masks[exact], maps[exact]
    has_defects = bool(masks.any()) and bool((~masks).any())
    return {"val_image_auroc": image_auroc(val.labels, scores),
            "val_pixel_auroc": pixel_auroc(masks, maps) if has_defects else math.nan,
            "val_pixel_ap": pixel_ap(masks, maps) if has_defects else math.nan}, preds
