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

import time
from pathlib import Path

import numpy as np

from prn.deploy.calibrate import calibrate_run, rates_at
from prn.deploy.loading import load_model as load_model_full
from prn.config import PRNConfig
from prn.data.datasets import load_sample, original_hw
from prn.data.sample import Sample
from prn.data.split import Split
from prn import distributed
from prn.errors import DataError, PRNError, UsageError
from prn.infer import Predictions, predict_samples, resize_map
from prn.metrics import compute_all
from prn.precision import check_precision
from prn.report import write_predictions, write_results
from prn.runs import category_name, make_split, new_run_dir, note, start_run  # noqa: F401 (API)
from prn.runs import records_outcome
from prn.train import resolve_device, train

# ----------------------------------------------------------------------------- fit

@records_outcome  # status.json: finished, or failed with the error (prn test then says so)
def fit(cfg: PRNConfig, *, run_dir: str | Path | None = None, progress: bool = True,
        split: Split | None = None, model: str = "prn") -> Path:
    """Split the data (A.2), fit prototypes and train PRN; returns the run folder.

    model: "prn", or one that trains nothing: "prototypes" (PRN's residual map alone) or
    "patchcore" (the baseline).

    Under torchrun (prn.distributed) every rank calls this alike: rank 0 makes the run folder
    and the others receive it; rank 0 alone writes files, and every rank returns once it has."""
    world, device = distributed.setup(resolve_device(cfg.device))
    if model == "prn":  # before any folder is made
        check_precision(cfg.precision, device)
        distributed.check_batch(cfg.batch_size, world)
    if model != "prn":
        if world.distributed:
            raise UsageError(f"--model {model} trains nothing, so it runs in one process: "
                             f"start it with prn, not torchrun")
        from prn.baselines.run import fit_patchcore, fit_prototype_map
        fitters = {"patchcore": fit_patchcore, "prototypes": fit_prototype_map}
        if model not in fitters:
            raise PRNError(f"unknown model {model!r}; choose prn, patchcore or prototypes")
        t0 = time.perf_counter()
        run_dir = fitters[model](cfg, run_dir=run_dir, progress=progress, split=split)
        note(run_dir, "fit_seconds", time.perf_counter() - t0)
    else:
        if world.is_main:
            run_dir, split, cfg = start_run(cfg, run_dir, split)
        run_dir, split, cfg = distributed.share_run(run_dir, split, cfg)
        t0 = time.perf_counter()
        train(cfg, split, run_dir, progress=progress)
        if world.is_main:
            note(run_dir, "fit_seconds", time.perf_counter() - t0)
    if world.is_main:
        _calibrate(run_dir, progress)
    distributed.barrier()  # the other ranks end when rank 0 has written everything
    return run_dir


def _calibrate(run_dir: Path, progress: bool) -> None:
    """Thresholds on the held-out fold, stored with the model (prn.deploy.calibrate)."""
    cal = calibrate_run(run_dir)
    if progress:
        print(f"threshold {cal['image_threshold']:.4g} at {100 * cal['target_fpr']:g} % false rejects "
              f"({cal['n_normal']} held-out good parts, {cal['method']})" if cal else
              "no held-out normal images: the model is not calibrated (prn calibrate RUN after adding data)")


def resume(run_dir: str | Path, *, epochs: int | None = None, progress: bool = True) -> Path:
    """Continue an interrupted run from its last checkpoint, with its own config and split."""
    run_dir = Path(run_dir)
    cfg = PRNConfig.load(run_dir / "config.yaml")
    split = Split.load(run_dir / "split.json")
    world, _ = distributed.setup(resolve_device(cfg.device))  # every rank reads the run folder
    if epochs is not None:
        cfg = cfg.replace(epochs=epochs)
        distributed.barrier()  # every rank has read config.yaml before rank 0 rewrites it
        if world.is_main:
            cfg.save(run_dir / "config.yaml")
    train(cfg, split, run_dir, resume=True, progress=progress)
    if world.is_main:
        _calibrate(run_dir, progress)
    distributed.barrier()
    return run_dir


# ----------------------------------------------------------------------------- loading

def load_model(checkpoint: str | Path, *, device: str | None = None):
    """(model in eval mode on its device, PRNConfig) from a run folder or a .pt file
    (``prn.deploy.loading.load_model`` gives the calibration too)."""
    loaded = load_model_full(checkpoint, device=device)
    return loaded.model, loaded.cfg


def _run_dir_of(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p if p.is_dir() else p.parent.parent


# ----------------------------------------------------------------------------- test

def evaluate(model, cfg: PRNConfig, samples: list[Sample], *, progress: bool = False) -> tuple[dict, Predictions]:
    preds = predict_samples(model, samples, cfg.input_hw, batch_size=cfg.eval_batch_size,
                            device=resolve_device(cfg.device), max_pixels=cfg.max_image_pixels,
                            progress=progress, precision=cfg.precision)
    metrics = compute_all(preds.labels, preds.scores, preds.masks, preds.maps)
    metrics["seconds_per_image"] = preds.seconds_per_image
    metrics["n_test"] = len(samples)
    metrics["n_test_anomalous"] = int(preds.labels.sum())
    return metrics, preds


def test(run: str | Path, *, out_dir: str | Path | None = None, save_maps: bool = False,
         overlays: int = 8, progress: bool = True, device: str | None = None) -> dict:
    """Evaluate a run on its own held-out test split; writes results and predictions."""
    run_dir = _run_dir_of(run)
    loaded = load_model_full(run, device=device)
    model, cfg = loaded.model, loaded.cfg
    split_path = run_dir / "split.json"
    if not split_path.is_file():
        raise DataError(f"{split_path}: the run has no split.json, so its test set is unknown")
    split = Split.load(split_path)
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics, preds = evaluate(model, cfg, split.test, progress=progress)
    if loaded.calibration:  # what the line would do at the stored threshold
        metrics.update(rates_at(preds.labels, preds.scores, loaded.calibration["image_threshold"]))
    name = category_name(cfg)
    write_results(out, {name: metrics}, title=f"{type(model).__name__} on {cfg.dataset} {name}")
    _write_prediction_files(out / "predictions", preds, split_root(cfg), save_maps,
                            threshold=metrics.get("threshold", metrics.get("f1_threshold")))
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

def predict(run: str | Path, inputs: str | Path, out_dir: str | Path, *,
            threshold: float | None = None, maps: str = "npy", masks: bool = False,
            overlays: int = 0, strict: bool = False, num_workers: int = 0, progress: bool = True,
            device: str | None = None):
    """Score new images into ``out_dir``: ``scores.csv`` (path, score, normalized_score,
    prediction, error) and ``maps/<mirrored path>.npy``; see ``prn.deploy.predict.predict_folder``.

    Decisions use the threshold calibrated at fit and stored in the checkpoint (``threshold``
    overrides it), so a bare checkpoint file decides as its run folder does. Returns a
    PredictSummary (csv path, counts of images, defective ones and unreadable files).
    """
    from prn.deploy.predict import Predictor, predict_folder
    predictor = Predictor(run, device=device, threshold=threshold)
    return predict_folder(predictor, inputs, out_dir, maps=maps, masks=masks, overlays=overlays,
                          strict=strict, num_workers=num_workers, progress=progress)


# ----------------------------------------------------------------------------- export

def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> Path:
    """The model as one ONNX or TorchScript file that runs without prn; see ``prn.deploy.export``."""
    from prn.deploy.export import export as export_model
    return export_model(run, fmt, out)
