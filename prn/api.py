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

import sys
import time
from pathlib import Path

import numpy as np

from prn import distributed, registry
from prn.config import PRNConfig
from prn.data.datasets import load_sample, original_hw
from prn.data.sample import Sample
from prn.data.split import Split
from prn.deploy.calibrate import (calibrate_predictions, calibration_messages, rates_at, review_rates,
                                  shell_word, write_calibration)
from prn.deploy.loading import load_model as load_model_full
from prn.errors import DataError, UsageError
from prn.infer import Predictions, predict_samples
from prn.metrics import auroc_interval, compute_all, decision_metrics, size_metrics
from prn.postprocess import MIN_REGION_AREA, Postprocess
from prn.precision import check_precision, resolve_precision
from prn.report import ResultWriter, check_out_folder, result_picture, write_results
from prn.runs import category_name, make_split, new_run_dir, note, start_run  # noqa: F401 (API)
from prn.runs import records_outcome
from prn.runtime import release_memory, resolve_device

# ----------------------------------------------------------------------------- fit

@records_outcome  # status.json: finished, or failed with the error (prn test then says so)
def fit(cfg: PRNConfig, *, run_dir: str | Path | None = None, progress: bool = True,
        split: Split | None = None, model: str = "prn", init_from: str | Path | None = None) -> Path:
    """Split the data (A.2), fit the model and calibrate it; returns the run folder.

    model: "prn", or one that trains nothing: "prototypes" (PRN's residual map alone) or
    "patchcore" (the baseline); see ``prn.registry``. The thresholds are set on the held-out
    fold's outputs of the model kept (``prn.deploy.calibrate``) and ``checkpoints/model.pt`` is
    written once, with them.

    Under torchrun (prn.distributed) every rank calls this alike: rank 0 makes the run folder
    and the others receive it; rank 0 alone writes files, and every rank returns once it has."""
    registry.check_kind(model)
    world, device = distributed.setup(resolve_device(cfg.runtime.device))
    if model == "prn":  # before any folder is made
        cfg = cfg.replace(precision=resolve_precision(cfg.training.precision, device))  # "auto", fixed
        check_precision(cfg.training.precision, device)
        distributed.check_batch(cfg.training.batch_size, world)
    elif world.distributed:
        raise UsageError(f"--model {model} trains nothing, so it runs in one process: "
                         f"start it with prn, not torchrun")
    if world.is_main:
        run_dir, split, cfg = start_run(cfg, run_dir, split)
    run_dir, split, cfg = distributed.share_run(run_dir, split, cfg)
    _fit_and_keep(model, cfg, split, run_dir, progress=progress, init_from=init_from)
    return run_dir


def _fit_and_keep(kind: str, cfg: PRNConfig, split: Split, run_dir: Path, *, progress: bool,
                  resume: bool = False, init_from: str | Path | None = None) -> None:
    """Fit, then on rank 0: calibrate on the fold's outputs the fit computed, and write
    model.pt (with the calibration) and calibration.json."""
    t0 = time.perf_counter()
    result = registry.fit(kind, cfg, split, run_dir, progress=progress, resume=resume,
                          init_from=None if init_from is None else Path(init_from))
    release_memory()  # training's batches and gradients, before calibration and a test
    if distributed.is_main():
        note(run_dir, "fit_seconds", time.perf_counter() - t0)
        t_cal = time.perf_counter()
        cal = calibrate_predictions(result.validation, cfg.calibration, registry.score_bound(kind),
                                    cfg.training.precision)
        if cal is not None and "defect_memory" in result.extra:  # kept with the threshold it moved
            cal["defect_memory"] = result.extra["defect_memory"]
        registry.save_model(run_dir, kind, cfg, result, cal)
        write_calibration(run_dir, cal)
        # where the fit's time went (fit_seconds less these: building the model, the synthesis's
        # set-up, checkpoints), and the calibration after it
        note(run_dir, "fit_phases_seconds", {**{k: round(v, 3) for k, v in result.phases.items()},
                                             "calibration": round(time.perf_counter() - t_cal, 3)})
        for kind, text in calibration_messages(cal, run_dir):
            print(f"prn fit: {kind}: {text}", file=sys.stderr)
        if progress:
            band = (f"; review band from {cal['review_threshold']:.4g} ({100 * cal['review_fpr']:g} % of good "
                    f"parts)" if cal and "review_threshold" in cal else "")
            print(f"threshold {cal['image_threshold']:.4g} at {100 * cal['target_fpr']:g} % false rejects "
                  f"({cal['n_normal']} held-out good parts, {cal['method']}){band}" if cal else
                  "no held-out normal images: the model is not calibrated (prn calibrate RUN after adding data)")
    distributed.barrier()  # the other ranks end when rank 0 has written everything


def resume(run_dir: str | Path, *, epochs: int | None = None, progress: bool = True) -> Path:
    """Continue an interrupted run from its last checkpoint, with its own config and split."""
    run_dir = Path(run_dir)
    cfg = PRNConfig.load(run_dir / "config.yaml")
    split = Split.load(run_dir / "split.json")
    world, _ = distributed.setup(resolve_device(cfg.runtime.device))  # every rank reads the run folder
    if epochs is not None:
        cfg = cfg.replace(epochs=epochs)
        distributed.barrier()  # every rank has read config.yaml before rank 0 rewrites it
        if world.is_main:
            cfg.save(run_dir / "config.yaml")
    _fit_and_keep("prn", cfg, split, run_dir, progress=progress, resume=True)
    return run_dir


# ----------------------------------------------------------------------------- loading

def load_model(checkpoint: str | Path, *, device: str | None = None):
    """(model in eval mode on its device, PRNConfig) from a run folder or a .pt file, for
    inference: where it infers in float32 its batch norms are folded into their convolutions
    (``prn.deploy.loading.load_model`` gives the calibration too, and ``fold=False``)."""
    loaded = load_model_full(checkpoint, device=device)
    return loaded.model, loaded.cfg


def _run_dir_of(checkpoint: str | Path) -> Path:
    p = Path(checkpoint)
    return p if p.is_dir() else p.parent.parent


# ----------------------------------------------------------------------------- test

def evaluate(model, cfg: PRNConfig, samples: list[Sample], *, progress: bool = False) -> tuple[dict, Predictions]:
    preds = predict_samples(model, samples, cfg.model.input_hw, batch_size=cfg.runtime.eval_batch_size,
                            device=resolve_device(cfg.runtime.device), max_pixels=cfg.data.max_image_pixels,
                            progress=progress, precision=cfg.training.precision, detail=cfg.model.detail)
    exact = preds.pixel_exact  # pixel metrics over the images whose masks are pixel truth
    metrics = compute_all(preds.labels, preds.scores, preds.masks[exact], preds.maps[exact])
    metrics["seconds_per_image"] = preds.seconds_per_image
    metrics["n_test"] = len(samples)
    metrics["n_test_anomalous"] = int(preds.labels.sum())
    return metrics, preds


def test(run: str | Path, *, out_dir: str | Path | None = None, save_maps: bool = False,
         overlays: int = 8, progress: bool = True, device: str | None = None,
         root: str | Path | None = None) -> dict:
    """Evaluate a run on its own held-out test split; writes results, ``predictions/scores.csv``
    (decided at the calibrated threshold, as ``prn predict`` does) and overlay pictures. ``root``:
    where the run's data set is now, if it moved since the fit (``Split.rerooted``)."""
    run_dir = _run_dir_of(run)
    if out_dir:
        check_out_folder(out_dir)
    loaded = load_model_full(run, device=device)
    model, cfg = loaded.model, loaded.cfg
    split_path = run_dir / "split.json"
    if not split_path.is_file():
        raise DataError(f"{split_path}: the run has no split.json, so its test set is unknown")
    split = Split.load(split_path)
    if root is not None:
        split = split.rerooted(root)
    missing = split.missing(split.test)
    if missing:  # said before any scoring, with what to do where the data set moved
        raise DataError(f"{split.not_found(missing)}; if the data set ({split.root}) has moved: "
                        f"prn test {shell_word(run)} --root NEW_FOLDER")
    out = Path(out_dir) if out_dir else run_dir
    out.mkdir(parents=True, exist_ok=True)
    metrics, preds = evaluate(model, cfg, split.test, progress=progress)
    post = Postprocess(loaded.calibration)
    if post.calibrated:  # what the line would do at the stored threshold
        metrics.update(rates_at(preds.labels, preds.scores, post.threshold))
        if loaded.calibration.get("target_fpr") is not None:
            metrics["target_fpr"] = float(loaded.calibration["target_fpr"])
        if post.review_threshold is not None:
            metrics.update(review_rates(preds.labels, preds.scores, post),
                           review_target_fpr=float(loaded.calibration["review_fpr"]))
        if "threshold_image" in loaded.calibration:  # whether one held-out image's score decides
            top = loaded.calibration["threshold_image"]  # (not recorded by calibrations before it)
            metrics["threshold_from_one_image"] = float(top is not None)
            if top is not None and top.get("next_score") is not None:
                metrics["threshold_image_next_score"] = float(top["next_score"])
        memory = loaded.calibration.get("defect_memory")
        if memory:  # whether the score carries the memory of the seen defects, and why
            auroc = memory.get("loo_auroc")
            metrics["defect_memory_kept"] = float(bool(memory["used"]))
            metrics["defect_memory_auroc"] = float("nan") if auroc is None else float(auroc)
    kinds = [s.defect_type for s in preds.samples]
    metrics.update(decision_metrics(preds.labels, preds.scores, kinds, post.threshold))
    metrics["image_auroc_low"], metrics["image_auroc_high"] = auroc_interval(preds.labels, preds.scores)
    # the masks are at the model's input size (nearest): their pixels there, and their share of the
    # image, close enough to the share of the photo
    pixels = np.where(preds.pixel_exact, preds.masks.sum(axis=(1, 2)), np.nan)
    metrics.update(size_metrics(preds.labels, preds.scores, pixels / (preds.masks.shape[1] * preds.masks.shape[2]),
                                 post.threshold))
    metrics.update(size_metrics(preds.labels, preds.scores, pixels, post.threshold, kind="pixels"))
    name = category_name(cfg)
    write_results(out, {name: metrics}, title=f"{type(model).__name__} on {cfg.data.dataset} {name}")
    normalized, predictions = post.judge(preds.scores)
    reviews = post.review(preds.scores)
    with ResultWriter(out / "predictions", split_root(cfg), post, maps="npy" if save_maps else "none") as writer:
        for i, s in enumerate(preds.samples):
            writer.add(s.image_path, preds.scores[i], None if normalized is None else normalized[i],
                       None if predictions is None else predictions[i], preds.maps[i],
                       original_hw(s) if save_maps else None, label=preds.labels[i],
                       review=None if reviews is None else reviews[i])
    # the same pictures as prn predict's, beside the ground truth: the highest-scoring defective
    # and good test images, so a reader sees hits and false alarms
    for i, picture_name in _pick_overlays(preds, overlays):
        s = preds.samples[i]
        image, _ = load_sample(s, cfg.model.input_hw, cfg.data.max_image_pixels, cfg.model.detail)
        result_picture(out / "images" / f"{picture_name}.png", image, preds.maps[i], post, preds.masks[i],
                       title=f"{s.image_path.name}  score {preds.scores[i]:.3f}")
    return metrics


def split_root(cfg: PRNConfig) -> Path:
    root = Path(cfg.data.root)
    return root / cfg.data.category if cfg.data.category and (root / cfg.data.category).is_dir() else root


def _pick_overlays(preds: Predictions, n: int) -> list[tuple[int, str]]:
    """The highest-scoring anomalous and normal images, so a reader sees hits and false alarms."""
    order = np.argsort(-preds.scores)
    picks = [i for i in order if preds.labels[i] == 1][: (n + 1) // 2]
    picks += [i for i in order if preds.labels[i] == 0][: n // 2]
    return [(i, f"{'defect' if preds.labels[i] else 'good'}_{preds.samples[i].defect_type}_"
                f"{preds.samples[i].image_path.stem}") for i in picks]


# ----------------------------------------------------------------------------- predict

def predict(run: str | Path, inputs: str | Path, out_dir: str | Path, *,
            threshold: float | None = None, maps: str = "npy", masks: bool = False,
            overlays: int = 0, strict: bool = False, num_workers: int = 0, progress: bool = True,
            device: str | None = None, require_decision: bool = False,
            min_region_area: int = MIN_REGION_AREA, engine: str = "torch", batch_size: int | None = None):
    """Score new images into ``out_dir``: ``scores.csv`` (path, score, normalized_score,
    prediction, error, regions), ``regions.jsonl`` (the defect regions of each image, at least
    ``min_region_area`` pixels) and ``maps/<mirrored path>.npy``; see
    ``prn.deploy.predict.predict_folder``.

    Decisions use the threshold calibrated at fit and stored in the checkpoint (``threshold``
    overrides it), so a bare checkpoint file decides as its run folder does; without either no
    decision is made (``summary.decided`` False), and ``require_decision`` refuses to run then.
    ``engine`` "onnx" runs the run's exported graph in onnxruntime (``prn.deploy.engine``).
    ``batch_size``: images per forward pass (default the runtime section's ``eval_batch_size``);
    the peak memory grows with it.
    Under torchrun the input list is shared out by rank and rank 0 merges (``prn.deploy.sharded``).
    Returns a PredictSummary (csv path, counts of images, defective ones and unreadable files).
    """
    from prn import distributed
    from prn.deploy.predict import Predictor, predict_folder
    check_out_folder(out_dir)
    options = dict(maps=maps, masks=masks, overlays=overlays, strict=strict, num_workers=num_workers,
                   min_region_area=min_region_area, engine=engine)
    if distributed.world().distributed:
        if require_decision:
            raise UsageError("--fail-on-defect is for one process: under torchrun read the prediction "
                             "column of the merged scores.csv")
        from prn.deploy.sharded import predict_sharded
        return predict_sharded(run, inputs, out_dir, device=device, threshold=threshold, progress=progress,
                               batch_size=batch_size, **options)
    predictor = Predictor(run, device=device, threshold=threshold, batch_size=batch_size)
    if require_decision and not predictor.postprocess.calibrated:
        raise UsageError(f"{predictor.loaded.path}: the model has no calibrated threshold, so no part "
                         f"would be judged defective and the line would pass them all; calibrate it "
                         f"(prn calibrate RUN) or give one (--threshold T)")
    return predict_folder(predictor, inputs, out_dir, progress=progress, **options)


# ----------------------------------------------------------------------------- export

def export(run: str | Path, fmt: str = "onnx", out: str | Path | None = None) -> Path:
    """The model as one ONNX, TorchScript or OpenVINO IR file that runs without prn; see
    ``prn.deploy.export``."""
    from prn.deploy.export import export as export_model
    return export_model(run, fmt, out)
