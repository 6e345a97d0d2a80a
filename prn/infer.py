"""Inference: samples -> anomaly maps and image scores, timed, for any model with PRN's eval API.

A model here is any ``nn.Module`` whose eval-mode ``forward(x[B,3,S,S] in [0,1])`` returns
``{"anomaly_map": (B,1,S,S), "pred_score": (B,)}`` (PRN and the PatchCore baseline both do).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from prn.data.datasets import ImageDataset
from prn.data.sample import Sample
from prn.precision import inference_autocast


@dataclass
class Predictions:
    """Per-image outputs at the model's input size H x W.

    scores: float64 (N,); maps: float32 (N,H,W); masks: bool (N,H,W); labels: int (N,);
    seconds_per_image: model time (forward pass, synchronised on CUDA) divided by N.
    """

    samples: list[Sample]
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    seconds_per_image: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def predict_samples(model: torch.nn.Module, samples: list[Sample], size: int | tuple[int, int], *,
                    batch_size: int = 16, device: torch.device | str = "cpu",
                    max_pixels: int = 50_000_000, num_workers: int = 0,
                    progress: bool = False, precision: str = "32") -> Predictions:
    """precision: the run's cfg.precision; the forward pass runs under its autocast
    (prn.precision.inference_autocast), maps and scores come out float32 whatever it is."""
    device = torch.device(device)
    model.eval().to(device)
    dataset = ImageDataset(samples, size, max_pixels)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    n = len(samples)
    scores = np.zeros(n, dtype=np.float64)
    maps = np.zeros((n, *dataset.size), dtype=np.float32)
    masks = np.zeros((n, *dataset.size), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    model_seconds = 0.0
    for batch in tqdm(loader, desc="inference", disable=not progress, leave=False):
        idx = batch["index"].numpy()
        images = batch["image"].to(device)
        _sync(device)
        t0 = time.perf_counter()
        with inference_autocast(device, precision):
            out = model(images)
        _sync(device)
        model_seconds += time.perf_counter() - t0
        maps[idx] = out["anomaly_map"][:, 0].float().cpu().numpy()
        scores[idx] = out["pred_score"].double().cpu().numpy()
        masks[idx] = batch["mask"][:, 0].numpy() > 0.5
        labels[idx] = batch["label"].numpy()
    return Predictions(samples, scores, maps, masks, labels, model_seconds / max(n, 1))


def resize_map(amap: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """float32 (h,w) -> float32 (H,W), bilinear, for maps at each image's original size."""
    t = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
    return F.interpolate(t, size=tuple(hw), mode="bilinear", align_corners=False)[0, 0].numpy()
