"""Prediction at scale: a folder of images -> scores.csv (+ maps, masks, pictures), streamed.

Each image is read and decoded once, by a DataLoader (optionally in worker processes); results
are written batch by batch, so memory stays flat however many images there are. A file that
cannot be read is reported in scores.csv's ``error`` column and the rest are still predicted
(``strict=True`` stops at the first instead). Decisions use the thresholds stored in the
checkpoint (``prn.deploy.calibrate``), so a bare checkpoint copied anywhere decides as its run.

    >>> predictor = Predictor("runs/mvtec/bottle/20260101-120000")
    >>> results = predictor.predict_arrays([uint8_image])   # [{"score", "normalized_score", ...}]
    >>> summary = predict_folder(predictor, "new_images/", "out/")
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from prn.data.datasets import as_hw, resize_image, to_tensor
from prn.data.io import read_image, require_images
from prn.deploy.calibrate import decide, normalize, normalize_map
from prn.deploy.loading import load_model
from prn.errors import CheckpointError, DataError, PRNError
from prn.infer import resize_map
from prn.precision import inference_autocast
from prn.report import mirrored_path, shown_path

MAP_FORMATS = ("npy", "png", "none")
CSV_COLUMNS = ("path", "score", "normalized_score", "prediction", "error")


class Predictor:
    """A loaded model with its decision rule. ``threshold`` overrides the calibrated image
    threshold; without either, scores come without predictions."""

    def __init__(self, checkpoint: str | Path, *, device: str | None = None,
                 threshold: float | None = None, batch_size: int | None = None):
        self.loaded = load_model(checkpoint, device=device)
        self.model, self.cfg = self.loaded.model, self.loaded.cfg
        self.calibration = self.loaded.calibration
        self.threshold = threshold if threshold is not None else (
            self.calibration["image_threshold"] if self.calibration else None)
        self.pixel_threshold = self.calibration["pixel_threshold"] if self.calibration else None
        self.input_hw = as_hw(self.cfg.input_hw)
        self.batch_size = batch_size or self.cfg.eval_batch_size

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (h, w, 3) at any size -> float32 (3, H, W) model input (prn's own resize)."""
        return to_tensor(resize_image(image, self.input_hw))

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """float32 (B, 3, H, W) -> (scores float64 (B,), maps float32 (B, H, W) at the input size)."""
        with inference_autocast(self.loaded.device, self.cfg.precision):  # as prn test and calibration
            out = self.model(batch.to(self.loaded.device))
        return (out["pred_score"].double().cpu().numpy(),
                out["anomaly_map"][:, 0].float().cpu().numpy())

    def judge(self, scores: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(normalised scores, predictions 0/1), each None when there is nothing to judge by."""
        normalized = normalize(scores, self.calibration, self.threshold) if self.calibration else None
        predictions = decide(scores, self.threshold) if self.threshold is not None else None
        return normalized, predictions

    def predict_arrays(self, images: list[np.ndarray]) -> list[dict]:
        """uint8 (h, w, 3) images -> per image {"score", "normalized_score", "prediction",
        "threshold", "map" (float32 at the image's own size)}."""
        results = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            scores, maps = self.forward(torch.stack([self.prepare(im) for im in chunk]))
            normalized, predictions = self.judge(scores)
            for j, image in enumerate(chunk):
                results.append({
                    "score": float(scores[j]),
                    "normalized_score": None if normalized is None else float(normalized[j]),
                    "prediction": None if predictions is None else int(predictions[j]),
                    "threshold": self.threshold,
                    "map": resize_map(maps[j], image.shape[:2]),
                })
        return results

    def region(self, amap: np.ndarray) -> np.ndarray:
        """bool (H, W): the pixels at or above the calibrated pixel threshold."""
        if self.pixel_threshold is None:
            raise CheckpointError(f"{self.loaded.path}: not calibrated, so it has no pixel threshold; "
                           f"run `prn calibrate RUN` first")
        return amap >= self.pixel_threshold

    def display_map(self, amap: np.ndarray) -> np.ndarray:
        """The map in [0, 1] for pictures: normalised (0.5 = pixel threshold) when calibrated,
        else clipped (PRN's maps are probabilities already)."""
        if self.calibration:
            return normalize_map(amap, self.calibration)
        return np.clip(amap, 0.0, 1.0).astype(np.float32)


class ImageFiles(Dataset):
    """Files -> {"index", "image" (model input, zeros on error), "hw" (original h, w), "error"}."""

    def __init__(self, files: list[Path], predictor: Predictor, max_pixels: int, keep_images: bool):
        self.files, self.predictor, self.max_pixels = files, predictor, max_pixels
        self.keep_images = keep_images  # the resized uint8 image too, for pictures

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        h, w = self.predictor.input_hw
        item = {"index": i, "image": torch.zeros(3, h, w), "hw": torch.zeros(2, dtype=torch.int64),
                "error": "", "resized": torch.zeros(h, w, 3, dtype=torch.uint8) if self.keep_images else 0}
        try:
            image = read_image(self.files[i], self.max_pixels)
        except DataError as exc:
            item["error"] = str(exc)
            return item
        small = resize_image(image, (h, w))
        item.update(image=to_tensor(small), hw=torch.tensor(image.shape[:2]))
        if self.keep_images:
            item["resized"] = torch.from_numpy(small)
        return item


@dataclass
class PredictSummary:
    out_dir: Path
    csv: Path
    n_images: int
    n_defective: int
    n_errors: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def predict_folder(predictor: Predictor, inputs: str | Path, out_dir: str | Path, *,
                   maps: str = "npy", masks: bool = False, overlays: int = 0, strict: bool = False,
                   num_workers: int = 0, progress: bool = True) -> PredictSummary:
    """Score an image or a folder of images (at any depth) into ``out_dir``.

    maps: "npy" (float32 maps at each image's size, raw model values), "png" (8-bit maps of the
    normalised values, 128 = the pixel threshold) or "none"; masks: binary defect masks as PNG
    (pixels >= the calibrated pixel threshold); overlays: pictures of the first N images (-1:
    all). Outputs mirror the input folder: ``maps/<rel path>.npy``, ``masks/<rel path>.png``.
    """
    if maps not in MAP_FORMATS:
        raise PRNError(f"maps must be one of {', '.join(MAP_FORMATS)}, got {maps!r}")
    if masks and predictor.pixel_threshold is None:
        raise CheckpointError(f"{predictor.loaded.path}: --masks needs a calibrated pixel threshold; "
                       f"run `prn calibrate RUN` first")
    inputs, out = Path(inputs), Path(out_dir)
    files = [inputs] if inputs.is_file() else require_images(inputs, what="input folder")
    root = inputs if inputs.is_dir() else inputs.parent
    out.mkdir(parents=True, exist_ok=True)
    overlays = len(files) if overlays < 0 else overlays
    dataset = ImageFiles(files, predictor, predictor.cfg.max_image_pixels, keep_images=overlays > 0)
    loader = DataLoader(dataset, batch_size=predictor.batch_size, num_workers=num_workers,
                        pin_memory=predictor.loaded.device.type == "cuda")
    used: dict[str, set] = {"maps": set(), "masks": set(), "images": set()}
    n_defective = n_errors = 0
    t0 = time.perf_counter()
    csv_path = out / "scores.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for batch in tqdm(loader, desc="predict", disable=not progress, leave=False):
            ok = [k for k, e in enumerate(batch["error"]) if not e]
            if strict and len(ok) < len(batch["error"]):
                bad = next(e for e in batch["error"] if e)
                raise DataError(f"{bad} (--strict stops at the first unreadable file)")
            scores = np.full(len(batch["error"]), np.nan)
            amaps = None
            if ok:
                scores_ok, amaps = predictor.forward(batch["image"][ok])
                scores[ok] = scores_ok
            normalized, predictions = predictor.judge(scores)
            for j, index in enumerate(batch["index"].tolist()):
                path, error = files[index], batch["error"][j]
                if error:
                    n_errors += 1
                    writer.writerow([shown_path(path, root), "", "", "", error])
                    continue
                pred = None if predictions is None else int(predictions[j])
                n_defective += pred or 0
                writer.writerow([shown_path(path, root), repr(float(scores[j])),
                                 "" if normalized is None else repr(float(normalized[j])),
                                 "" if pred is None else pred, ""])
                small = amaps[ok.index(j)]
                if maps != "none" or masks:
                    full = resize_map(small, tuple(batch["hw"][j].tolist()))
                if maps == "npy":
                    np.save(mirrored_path(path, root, out / "maps", ".npy", used["maps"]), full)
                elif maps == "png":
                    level = np.round(predictor.display_map(full) * 255).astype(np.uint8)
                    _png(mirrored_path(path, root, out / "maps", ".png", used["maps"]), level)
                if masks:
                    region = predictor.region(full).astype(np.uint8) * 255
                    _png(mirrored_path(path, root, out / "masks", ".png", used["masks"]), region)
                if index < overlays:
                    from prn.viz import save_overlay
                    title = f"{path.name}  score {scores[j]:.3f}" + (
                        "" if pred is None else ("  DEFECTIVE" if pred else "  good"))
                    save_overlay(mirrored_path(path, root, out / "images", ".png", used["images"]),
                                 batch["resized"][j].numpy(), predictor.display_map(small), None,
                                 threshold=0.5, title=title)
            fh.flush()
    return PredictSummary(out, csv_path, len(files), n_defective, n_errors, time.perf_counter() - t0)
