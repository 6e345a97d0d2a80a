"""The Python API of prn; the CLI (``prn <verb>``) is a thin layer over these functions.

    >>> from prn import api
    >>> from prn.config import PRNConfig
    >>> cfg = PRNConfig(dataset="mvtec", root="/data/mvtec", category="bottle")
    >>> run = api.fit(cfg)                      # runs/mvtec/bottle/<time>/
    >>> metrics = api.test(run)                 # results.json, results.md, predictions/
    >>> api.predict(run, "new_images/", "out/") # scores.csv, maps/*.npy

Every run folder holds ``config.yaml``, ``split.json`` (the exact file lists), ``environment.json``
(versions), ``checkpoints/last.pt``, and after testing ``results.json``/``results.md``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from prn.checkpoint import load_checkpoint
from prn.config import PRNConfig
from prn.data.datasets import load_sample, original_hw
from prn.data.io import read_image, require_images
from prn.data.sample import Sample
from prn.data.split import Split
from prn.errors import DataError, PRNError
from prn.infer import Predictions, predict_samples, resize_map
from prn.metrics import compute_all
from prn.report import write_predictions, write_results
from prn.runs import category_name, make_split, new_run_dir, note, start_run  # noqa: F401 (API)
from prn.train import build_model, resolve_device, train

# ----------------------------------------------------------------------------- fit

def fit(cfg: PRNConfig, *, run_dir: str | Path | None = None, progress: bool = True,
        split: Split | None = None, model: str = "prn") -> Path:
    """Split the data (A.2), fit prototypes and train PRN; returns the run folder.

    model: "prn", or one that trains nothing: "prototypes" (PRN's residual map alone) or
    "patchcore" (the baseline)."""
    if model != "prn":
        from prn.baselines.run import fit_patchcore, fit_prototype_map
        fitters = {"patchcore": fit_patchcore, "prototypes": fit_prototype_map}
        if model not in fitters:
            raise PRNError(f"unknown model {model!r}; choose prn, patchcore or prototypes")
        t0 = time.perf_counter()
        run_dir = fitters[model](cfg, run_dir=run_dir, progress=progress, split=split)
        note(run_dir, "fit_seconds", time.perf_counter() - t0)
        return run_dir
    run_dir, split, cfg = start_run(cfg, run_dir, split)
    t0 = time.perf_counter()
    train(cfg, split, run_dir, progress=progress)
    note(run_dir, "fit_seconds", time.perf_counter() - t0)
    return run_dir


def resume(run_dir: str | Path, *, epochs: int | None = None, progress: bool = True) -> Path:
    """Continue an interrupted run from its last checkpoint, with its own config and split."""
    run_dir = Path(run_dir)
    cfg = PRNConfig.load(run_dir / "config.yaml")
    if epochs is not None:
        cfg = cfg.replace(epochs=epochs)
        cfg.save(run_dir / "config.yaml")
    split = Split.load(run_dir / "split.json")
    train(cfg, split, run_dir, resume=True, progress=progress)
    return run_dir


# ----------------------------------------------------------------------------- loading

def load_model(checkpoint: str | Path, *, device: str | None = None):
    """(model in eval mode on its device, PRNConfig) from a run folder or a .pt file."""
    payload = load_checkpoint(checkpoint)
    cfg = PRNConfig.from_dict(payload["config"])
    if device is not None:
        cfg = cfg.replace(device=device)
    kind = payload.get("model")
    if kind == "prn":
        model = build_model(cfg, pretrained=False)
    elif kind == "patchcore":
        from prn.baselines.run import build_patchcore
        model = build_patchcore(cfg, pretrained=False)
    elif kind == "prototypes":
        from prn.baselines.run import build_prototype_map
        model = build_prototype_map(cfg, pretrained=False)
    else:
        raise PRNError(f"{checkpoint}: unknown model kind {kind!r}")
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise PRNError(f"{checkpoint}: weights do not fit a {cfg.backbone} {kind} model: "
                       f"{str(exc).splitlines()[0]}") from exc
    model.eval().to(resolve_device(cfg.device))
    return model, cfg


def _run_dir_of(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p if p.is_dir() else p.parent.parent


# ----------------------------------------------------------------------------- test

def evaluate(model, cfg: PRNConfig, samples: list[Sample], *, progress: bool = False) -> tuple[dict, Predictions]:
    preds = predict_samples(model, samples, cfg.input_hw, batch_size=cfg.eval_batch_size,
                            device=resolve_device(cfg.device), max_pixels=cfg.max_image_pixels,
                            progress=progress)
    metrics = compute_all(preds.labels, preds.scores, preds.masks, preds.maps)
    metrics["seconds_per_image"] = preds.seconds_per_image
    metrics["n_test"] = len(samples)
    metrics["n_test_anomalous"] = int(preds.labels.sum())
    return metrics, preds


def test(run: str | Path, *, out_dir: str | Path | None = None, save_maps: bool = False,
         overlays: int = 8, progress: bool = True, device: str | None = None) -> dict:
    """Evaluate a run on its own held-out test split; writes results and predictions."""
    run_dir = _run_dir_of(run)
    model, cfg = load_model(run, device=device)
    split_path = run_dir / "split.json"
    if not split_path.is_file():
        raise DataError(f"{split_path}: the run has no split.json, so its test set is unknown")
    split = Split.load(split_path)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics, preds = evaluate(model, cfg, split.test, progress=progress)
    name = category_name(cfg)
    write_results(out, {name: metrics}, title=f"{type(model).__name__} on {cfg.dataset} {name}")
    _write_prediction_files(out / "predictions", preds, split_root(cfg), save_maps,
                            threshold=metrics.get("f1_threshold"))
    if overlays:
        _write_overlays(out / "images", preds, cfg, _pick_overlays(preds, overlays), with_truth=True)
    return metrics


def split_root(cfg: PRNConfig) -> Path:
    root = Path(cfg.root)
    return root / cfg.category if cfg.category and (root / cfg.category).is_dir() else root


def _write_prediction_files(out: Path, preds: Predictions, root: Path, save_maps: bool,
                            threshold: float | None = None) -> None:
    records = []
    for i, s in enumerate(preds.samples):
        amap = resize_map(preds.maps[i], original_hw(s)) if save_maps else None
        records.append((s.image_path, float(preds.scores[i]), amap, int(preds.labels[i])))
    write_predictions(out, records, root, threshold=threshold)


def _pick_overlays(preds: Predictions, n: int) -> list[tuple[int, str]]:
    """The highest-scoring anomalous and normal images, so a reader sees hits and false alarms."""
    order = np.argsort(-preds.scores)
    picks = [i for i in order if preds.labels[i] == 1][: (n + 1) // 2]
    picks += [i for i in order if preds.labels[i] == 0][: n // 2]
    return [(i, f"{'defect' if preds.labels[i] else 'good'}_{preds.samples[i].defect_type}_"
                f"{preds.samples[i].image_path.stem}") for i in picks]


def _write_overlays(out: Path, preds: Predictions, cfg: PRNConfig, picks: list[tuple[int, str]],
                    with_truth: bool) -> None:
    from prn.viz import save_overlay
    out.mkdir(parents=True, exist_ok=True)
    # PRN's maps are probabilities; PatchCore's and the residual maps are raw distances, shown
    # scaled to the set's max.
    scale = max(1.0, float(preds.maps.max()))
    for i, name in picks:
        s = preds.samples[i]
        image, _ = load_sample(s, cfg.input_hw, cfg.max_image_pixels)
        save_overlay(out / f"{name}.png", image, preds.maps[i] / scale,
                     preds.masks[i] if with_truth else None,
                     threshold=0.5, title=f"{s.image_path.name}  score {preds.scores[i]:.3f}")


# ----------------------------------------------------------------------------- predict

def list_images(path: Path) -> list[Path]:
    return [path] if path.is_file() else require_images(path, what="input folder")


def predict(run: str | Path, inputs: str | Path, out_dir: str | Path, *,
            threshold: float | None = None, overlays: bool = False, progress: bool = True,
            device: str | None = None) -> Path:
    """Score new images: ``out_dir/scores.csv`` and ``out_dir/maps/<mirrored path>.npy``.

    The threshold for the ``prediction`` column is ``threshold`` when given, else the F1-max
    threshold that ``prn test`` stored in the run's results.json, else none (scores only).
    """
    model, cfg = load_model(run, device=device)
    inputs = Path(inputs)
    files = list_images(inputs)
    for f in files:  # fail on the first bad file before spending time on the model
        read_image(f, cfg.max_image_pixels)
    if threshold is None:
        results = _run_dir_of(run) / "results.json"
        if results.is_file():  # a run's results.json holds one category, so its mean row is it
            threshold = json.loads(results.read_text()).get("mean", {}).get("f1_threshold")
    samples = [Sample(f, None, 0, "unknown") for f in files]
    preds = predict_samples(model, samples, cfg.input_hw, batch_size=cfg.eval_batch_size,
                            device=resolve_device(cfg.device), max_pixels=cfg.max_image_pixels,
                            progress=progress)
    out = Path(out_dir)
    records = [(s.image_path, float(preds.scores[i]), resize_map(preds.maps[i], original_hw(s)), None)
               for i, s in enumerate(samples)]
    write_predictions(out, records, inputs if inputs.is_dir() else inputs.parent, threshold=threshold)
    if overlays:
        picks = [(i, f"{i:05d}_{s.image_path.stem}") for i, s in enumerate(samples)]
        _write_overlays(out / "images", preds, cfg, picks, with_truth=False)
    return out
