"""Prediction at scale: a folder of images -> scores.csv (+ maps, masks, pictures), streamed.

Each image is read and decoded once, by a DataLoader (optionally in worker processes); results
are written batch by batch, so memory stays flat however many images there are. A file that
cannot be read is reported in scores.csv's ``error`` column and the rest are still predicted
(``strict=True`` stops at the first instead). Decisions use the thresholds stored in the
checkpoint (``prn.deploy.calibrate``), so a bare checkpoint copied anywhere decides as its run.

    >>> predictor = Predictor("runs/mvtec/bottle/20260101-120000")
    >>> results = predictor.predict_arrays([uint8_image])   # [{"score", "normalized_score", ...}]
    >>> summary = predict_folder(predictor, "new_images/", "out/")   # scores.csv, regions.jsonl, maps
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from prn.data.io import require_images
from prn.deploy.drift import appearance, compare_appearance
from prn.deploy.engine import make_engine
from prn.deploy.loading import load_model
from prn.errors import CheckpointError, DataError, PRNError, UsageError
from prn.pipeline import InferencePipeline, forward_model
from prn.postprocess import MIN_REGION_AREA, check_min_area, resize_map
from prn.preprocess import OFF, Detail, read_resized, resize_image, to_tensor
from prn.report import MAP_FORMATS, ResultWriter
from prn.runtime import read_ahead


class Predictor:
    """A loaded model inside its pipeline (``prn.pipeline.InferencePipeline``: the one pre-process,
    the model, the post-process holding the calibration). ``threshold`` overrides the calibrated
    image threshold; without either, scores come without predictions. ``engine_threads``:
    onnxruntime's threads for the onnx engine (default: as many as torch is given)."""

    def __init__(self, checkpoint: str | Path, *, device: str | None = None,
                 threshold: float | None = None, batch_size: int | None = None, engine: str = "torch",
                 engine_threads: int | None = None):
        self.loaded = load_model(checkpoint, device=device)
        self.model, self.cfg = self.loaded.model, self.loaded.cfg
        self.calibration = self.loaded.calibration
        self.pipeline = InferencePipeline(self.model, self.cfg.model.input_hw, self.calibration, threshold,
                                          self.cfg.model.detail)
        self.postprocess = self.pipeline.postprocess
        self.threshold = self.postprocess.threshold
        self.pixel_threshold = self.postprocess.pixel_threshold
        self.input_hw = self.pipeline.preprocess.input_hw
        self.detail = self.pipeline.preprocess.detail
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size or self.cfg.runtime.eval_batch_size
        # what runs the model on uint8 batches at the input size (prn.deploy.engine): torch or onnx
        self.engine_name = engine
        self.engine = make_engine(self, engine, threads=engine_threads)

    def resize(self, image: np.ndarray) -> np.ndarray:
        """uint8 (h, w, 3) at any size -> uint8 (H, W, 3) at the model's input size (the pipeline's
        resize, and its filter before, run by Pillow: ``prn.preprocess.resize_image``)."""
        return resize_image(image, self.input_hw, self.detail)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """uint8 (h, w, 3) at any size -> float32 (3, H, W) model input (the pipeline's pre-process)."""
        return to_tensor(self.resize(image))

    def forward(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """float32 (B, 3, H, W) -> (scores float64 (B,), maps float32 (B, H, W) at the input size)."""
        return forward_model(self.model, batch, self.loaded.device, self.cfg.training.precision)

    def judge(self, scores: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(normalised scores, predictions 0/1), each None when there is nothing to judge by."""
        return self.postprocess.judge(scores)

    def _batches(self, images: list[np.ndarray], resized: list[np.ndarray] | None = None):
        """(chunk, the uint8 (B, H, W, 3) batch at the input size, scores, maps at the input size)
        for each batch of uint8 (h, w, 3) images; ``resized``: theirs already (``resize``)."""
        if resized is not None and len(resized) != len(images):
            raise ValueError(f"{len(images)} images and {len(resized)} resized ones")
        for i in range(0, len(images), self.batch_size):
            chunk = images[i:i + self.batch_size]
            done = resized[i:i + self.batch_size] if resized is not None else [self.resize(im) for im in chunk]
            batch = torch.stack([torch.from_numpy(im) for im in done])
            yield chunk, batch, *self.engine(batch)

    def scores(self, images: list[np.ndarray]) -> np.ndarray:
        """float64 (N,) image scores of uint8 (h, w, 3) images, without their maps."""
        return np.concatenate([s for _, _, s, _ in self._batches(images)]) if images else np.zeros(0)

    def compare_look(self, looks: np.ndarray, subject: str = "these {n} images") -> dict | None:
        """``prn.deploy.drift.compare_appearance`` of (N, 2) ``looks`` against this model's
        calibration, with its config's tolerances."""
        return compare_appearance((self.calibration or {}).get("appearance"), looks, self.cfg.calibration, subject)

    def predict_arrays(self, images: list[np.ndarray], *, full_size: bool = True,
                       resized: list[np.ndarray] | None = None) -> list[dict]:
        """uint8 (h, w, 3) images -> per image {"score", "normalized_score", "prediction", "review"
        (1 in the review band, None without one), "threshold", "map" (float32 at the image's own
        size; at the model's input size with ``full_size=False``, for a caller that resizes only
        what it needs: ``Postprocess.map_for``), "brightness" and "detail" (at the model's input:
        ``prn.deploy.drift``)}. ``resized``: the images already at the input size (``resize``,
        e.g. made in the callers' threads while the model ran: ``prn serve``)."""
        results = []
        for chunk, batch, scores, maps in self._batches(images, resized):
            looks = appearance(batch)
            normalized, predictions = self.judge(scores)
            reviews = self.postprocess.review(scores)
            for j, image in enumerate(chunk):
                results.append({
                    "score": float(scores[j]),
                    "normalized_score": None if normalized is None else float(normalized[j]),
                    "prediction": None if predictions is None else int(predictions[j]),
                    "review": None if reviews is None else int(reviews[j]),
                    "threshold": self.threshold,
                    "map": resize_map(maps[j], image.shape[:2]) if full_size else maps[j],
                    "brightness": float(looks[j, 0]), "detail": float(looks[j, 1]),
                })
        return results

    def region(self, amap: np.ndarray) -> np.ndarray:
        """bool (H, W): the pixels at or above the calibrated pixel threshold."""
        if self.pixel_threshold is None:
            raise CheckpointError(f"{self.loaded.path}: not calibrated, so it has no pixel threshold; "
                                  f"run `prn calibrate RUN` first")
        return self.postprocess.region(amap)

    def regions(self, amap: np.ndarray, min_area: int = MIN_REGION_AREA) -> list | None:
        """The defect regions (``prn.postprocess.Region``) of a map at the image's own size, so
        their boxes are in the image's pixels; None without a calibrated pixel threshold."""
        return self.postprocess.regions(amap, min_area)

    def display_map(self, amap: np.ndarray) -> np.ndarray:
        """The map in [0, 1] for pictures (``Postprocess.display_map``: 0.5 = pixel threshold)."""
        return self.postprocess.display_map(amap)


class ImageFiles(Dataset):
    """Files -> {"index", "resized" (uint8 (H, W, 3) at the model's input size, zeros on error),
    "hw" (original h, w), "error"}. Decoding and resizing happen here, in the DataLoader's workers
    when there are any, while the model runs on the previous batch; the items hold no model, so
    workers start light on any platform."""

    def __init__(self, files: list[Path], input_hw: tuple[int, int], max_pixels: int, detail: Detail = OFF):
        self.files, self.input_hw, self.max_pixels, self.detail = files, tuple(input_hw), max_pixels, detail

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        h, w = self.input_hw
        item = {"index": i, "resized": torch.zeros(h, w, 3, dtype=torch.uint8),
                "hw": torch.zeros(2, dtype=torch.int64), "error": ""}
        try:
            resized, hw = read_resized(self.files[i], self.input_hw, self.max_pixels, self.detail)
        except DataError as exc:
            item["error"] = str(exc)
            return item
        item.update(resized=torch.from_numpy(resized), hw=torch.tensor(hw))
        return item


@dataclass
class PredictSummary:
    out_dir: Path
    csv: Path
    n_images: int
    n_defective: int
    n_errors: int
    seconds: float
    decided: bool = True  # False: no threshold, so no prediction was made
    regions: Path | None = None  # regions.jsonl; None without a pixel threshold
    n_review: int | None = None  # passed, but in the review band; None without a band
    # the scored images' look against the calibration's (prn.deploy.drift.compare_appearance),
    # also in appearance.json; None without a reference or with too few images
    appearance: dict | None = None
    looks: np.ndarray | None = field(default=None, repr=False)  # (N, 2) brightness, detail of each

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("nan")


APPEARANCE_FILE = "appearance.json"


def check_appearance(predictor: Predictor, looks: np.ndarray, out: Path) -> dict | None:
    """The scored images' ``looks`` against the calibration's good images, written to
    ``out/appearance.json`` (with the reference) when there is anything to compare."""
    check = predictor.compare_look(looks)
    if check is not None:
        reference = predictor.calibration["appearance"]
        (out / APPEARANCE_FILE).write_text(json.dumps({**check, "reference": reference}, indent=1) + "\n")
    return check


def input_files(inputs: Path) -> tuple[list[Path], Path]:
    """An image or a folder of images (at any depth, sorted) -> (the files, the root their rows
    and outputs are named from)."""
    files = [inputs] if inputs.is_file() else require_images(inputs, what="input folder")
    return files, inputs if inputs.is_dir() else inputs.parent


def predict_folder(predictor: Predictor, inputs: str | Path, out_dir: str | Path, *,
                   maps: str = "npy", masks: bool = False, overlays: int = 0, strict: bool = False,
                   num_workers: int = 0, progress: bool = True,
                   min_region_area: int = MIN_REGION_AREA, engine: str = "torch",
                   shard: tuple[int, int] = (0, 1)) -> PredictSummary:
    """Score an image or a folder of images (at any depth) into ``out_dir``.

    maps: "npy" (float32 maps at each image's size, raw model values), "png" (8-bit maps of the
    normalised values, 128 = the pixel threshold) or "none"; masks: binary defect masks as PNG
    (pixels >= the calibrated pixel threshold); overlays: pictures of the first N images (-1:
    all). Outputs mirror the input folder: ``maps/<rel path>.npy``, ``masks/<rel path>.png``.

    Defect regions (``Postprocess.regions``: connected pixels >= the pixel threshold, boxes in
    each image's own pixels, at least ``min_region_area`` pixels) go to ``regions.jsonl`` and
    their count to scores.csv's last column, ``regions``; without a calibrated pixel threshold
    the column stays empty and no regions.jsonl is written (``summary.regions`` None).

    engine: "torch" or "onnx" (``prn.deploy.engine``: onnxruntime on the run's exported graph,
    exported on first use); the decisions are the Predictor's either way.

    shard (rank, size): score only the files rank, rank + size, ... of the input list, into
    ``out_dir`` as given (``prn.deploy.sharded`` gives each rank its own folder and merges them);
    overlays stay those of the first N images of the whole list.

    The images' brightness and detail at the model's input are compared with those of the good
    images the run was calibrated on (``prn.deploy.drift``): ``summary.appearance`` and
    ``appearance.json`` (by ``prn.deploy.sharded`` over all ranks when sharded).
    """
    min_region_area = check_min_area(min_region_area)
    if maps not in MAP_FORMATS:
        raise PRNError(f"maps must be one of {', '.join(MAP_FORMATS)}, got {maps!r}")
    if masks and predictor.pixel_threshold is None:
        raise CheckpointError(f"{predictor.loaded.path}: --masks needs a calibrated pixel threshold; "
                              f"run `prn calibrate RUN` first")
    inputs, out = Path(inputs), Path(out_dir)
    files, root = input_files(inputs)
    overlays = len(files) if overlays < 0 else overlays
    rank, size = shard
    files = files[rank::size]
    forward = predictor.engine if engine == predictor.engine_name else make_engine(predictor, engine, progress)
    dataset = ImageFiles(files, predictor.input_hw, predictor.cfg.data.max_image_pixels, predictor.detail)
    loader = DataLoader(dataset, batch_size=predictor.batch_size, num_workers=num_workers,
                        pin_memory=predictor.loaded.device.type == "cuda")
    n_defective = n_errors = n_review = 0
    looks = []
    t0 = time.perf_counter()
    with ResultWriter(out, root, predictor.postprocess, maps=maps, masks=masks, regions=True,
                      min_region_area=min_region_area) as writer:
        # in process, the next batch is decoded in a thread while the model runs on this one
        batches = read_ahead(loader) if num_workers == 0 else loader
        for batch in tqdm(batches, total=len(loader), desc="predict", disable=not progress, leave=False):
            ok = [k for k, e in enumerate(batch["error"]) if not e]
            if strict and len(ok) < len(batch["error"]):
                bad = next(e for e in batch["error"] if e)
                raise DataError(f"{bad} (--strict stops at the first unreadable file)")
            scores = np.full(len(batch["error"]), np.nan)
            amaps = None
            if ok:
                scores_ok, amaps = forward(batch["resized"][ok])
                scores[ok] = scores_ok
                looks.append(appearance(batch["resized"][ok]))
            normalized, predictions = predictor.judge(scores)
            reviews = predictor.postprocess.review(scores)
            for j, index in enumerate(batch["index"].tolist()):
                path, error = files[index], batch["error"][j]
                if error:
                    n_errors += 1
                    writer.error(path, error)
                    continue
                pred = None if predictions is None else int(predictions[j])
                review = None if reviews is None else int(reviews[j])
                n_defective += pred or 0
                n_review += review or 0
                small = amaps[ok.index(j)]
                writer.add(path, scores[j], None if normalized is None else normalized[j], pred,
                           small, tuple(batch["hw"][j].tolist()), review=review)
                if rank + index * size < overlays:
                    title = f"{path.name}  score {scores[j]:.3f}" + (
                        "" if pred is None else ("  DEFECTIVE" if pred else "  REVIEW" if review else "  good"))
                    writer.overlay(path, batch["resized"][j].numpy(), small, title=title)
            writer.flush()
    looks = np.concatenate(looks) if looks else np.zeros((0, 2))
    return PredictSummary(out, writer.csv_path, len(files), n_defective, n_errors, time.perf_counter() - t0,
                          predictor.postprocess.calibrated, writer.regions_path,
                          None if predictor.postprocess.review_threshold is None else n_review,
                          check_appearance(predictor, looks, out) if size == 1 else None, looks)
