"""Whether a run's calibrated threshold holds when the line's photos drift: other light, a softer
focus, stronger compression.

A threshold is set once, on the good parts of the day of the fit; the line's lamp ages, its lens is
knocked, its camera's settings change. For each run this copies the run's test folder with every
photo changed one way (``transformed_set.transform_tree``: values times F, a Gaussian blur of S
pixels of the photo, JPEG quality Q), scores the copy with ``prn predict`` (the run's pre-process,
model and calibrated threshold, its ``prediction`` column), and judges the split's test images:
the false-reject rate on the good parts, the recall on the defects, and image AUROC (how well the
scores still rank, whatever the threshold). Beside them, the same after a calibration on the
changed line: the run's held-out good images (``split.json`` ``val_normal``) changed the same way,
scored, and a threshold fitted to them as the fit fits one (``prn.deploy.calibrate.image_threshold``,
the run's target and tail), which is what `prn calibrate RUN --good-images DIR` with photos of the
changed line would do. And what ``prn predict`` says of the good parts' look against the good images
the run was calibrated on (``prn.deploy.drift``: the change of their median brightness and detail,
and whether it warned). ``re-encoded``, the photos written again unchanged at quality 95 as every
other copy is, is the row to compare the others with. Nothing is chosen here: it says how far the
decision moves with each drift, and whether calibrating again brings it back.

    python benchmarks/line_drift.py RUN [RUN ...] [--drift NAME ...] [--work DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from prn import api, registry
from prn.config import CalibrationConfig, PRNConfig
from prn.data.split import Split
from prn.deploy.calibrate import image_threshold, rates_at
from prn.deploy.drift import compare_appearance
from prn.metrics import image_auroc
from transformed_set import transform_tree  # benchmarks/ is the script's folder, so on sys.path

DRIFTS = {"re-encoded": {}, "brightness 0.8": {"brightness": 0.8}, "brightness 0.9": {"brightness": 0.9},
          "brightness 1.1": {"brightness": 1.1}, "brightness 1.2": {"brightness": 1.2},
          "blur 1.5 px": {"blur": 1.5}, "JPEG 70": {"quality": 70}}
KEYS = ("false_reject_rate", "recall", "image_auroc", "recalibrated_false_reject_rate", "recalibrated_recall")


def drifted_copy(root: Path, drift: str, work: Path) -> Path:
    """A copy of ``root``'s test and train/good folders under ``work`` with ``drift``, made once: a
    copy already there (its ``.done`` written last) is used again."""
    dst = work / root.name / drift.replace(" ", "_")
    if (dst / ".done").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for part in ("test", "train/good"):  # the test split, and the held-out good images among these
        transform_tree(root / part, dst / part, reencode=True, **DRIFTS[drift])
    (dst / ".done").write_text("")
    return dst


def scored(run: Path, copy: Path, root: Path, samples: list, out: Path) -> tuple[list[dict], np.ndarray]:
    """The ``scores.csv`` rows of ``samples`` (images under ``root``) in ``copy``: ``prn predict``
    of the run on a folder of their drifted copies alone; and their brightness and detail as
    predict measured them (``summary.looks``, (N, 2), in the samples' order)."""
    rels = [Path(s.image_path).resolve().relative_to(root.resolve()).as_posix() for s in samples]
    folder = out / "inputs"
    for rel in rels:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(copy / rel, folder / rel)
    summary = api.predict(run, folder, out / "predicted", maps="none", progress=False)
    with Path(summary.csv).open() as f:
        listed = list(csv.DictReader(f))  # in the order predict read the files, as summary.looks
    rows = {r["path"]: r for r in listed}
    missing = [rel for rel in rels if not (rows.get(rel) or {}).get("score")]
    if missing:  # the folder holds these files alone, so none unread is left: looks align with rows
        raise SystemExit(f"{copy}: no score for {missing[0]} in {summary.csv}")
    looks = dict(zip((r["path"] for r in listed), summary.looks))
    return [rows[rel] for rel in rels], np.array([looks[rel] for rel in rels])


def judged(run: Path, split: Split, calibration: dict, cfg: CalibrationConfig, copy: Path, root: Path,
           out: Path) -> dict:
    """The run on ``copy``: its test split judged at its calibrated threshold (FRR, recall, AUROC)
    and at a threshold fitted by the fit's rule (the ``calibration``'s target false-reject rate and
    the config's tail) to its held-out good images in ``copy`` (``recalibrated_*``)."""
    rows, looks = scored(run, copy, root, split.test, out / "test")
    y = np.array([s.label for s in split.test])
    s = np.array([float(r["score"]) for r in rows])
    d = np.array([r["prediction"] == "1" for r in rows])
    held_out = np.array([float(r["score"]) for r in scored(run, copy, root, split.val_normal, out / "held_out")[0]])
    t, _ = image_threshold(held_out, calibration["target_fpr"], cfg.calibration_tail,
                           score_bound=registry.score_bound("prn"))
    again = rates_at(y, s, t)
    # what predict says of the good test parts' look against the calibration's (prn.deploy.drift):
    # the good ones alone, as on a line, where a few defective parts do not move the medians
    # (a test split of BSData is half defects); None for a run calibrated before the check
    look = compare_appearance(calibration.get("appearance"), looks[y == 0], cfg)
    return {"n_good": int((y == 0).sum()), "n_defective": int((y == 1).sum()),
            "false_reject_rate": float(d[y == 0].mean()), "recall": float(d[y == 1].mean()),
            "image_auroc": image_auroc(y, s), "recalibrated_threshold": float(t),
            "recalibrated_false_reject_rate": again["false_reject_rate"],
            "recalibrated_recall": again["recall"],
            "brightness_change": None if look is None else look["brightness_change"],
            "detail_change": None if look is None else look["detail_change"],
            "warned": None if look is None else look["drifted"]}


def look_cells(rows: list[dict]) -> str:
    """The table's last three cells: the good parts' brightness and detail changes (% against the
    calibration's good images, means over ``rows``) and how many of the rows predict warned on."""
    if any(r["warned"] is None for r in rows):
        return "- | - | -"
    return (f"{100 * np.mean([r['brightness_change'] for r in rows]):+.1f} | "
            f"{100 * np.mean([r['detail_change'] for r in rows]):+.1f} | {sum(r['warned'] for r in rows)} of {len(rows)}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="fitted and calibrated run folders")
    ap.add_argument("--drift", action="append", choices=tuple(DRIFTS), help="these drifts only "
                    "(re-encoded is always measured)")
    ap.add_argument("--work", type=Path, help="keep the drifted copies here and use them again "
                    "(default: a temporary folder, removed at the end)")
    ap.add_argument("--json", type=Path, help="write every row here")
    args = ap.parse_args(argv)
    drifts = ["re-encoded"] + [d for d in DRIFTS if d != "re-encoded" and (not args.drift or d in args.drift)]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        results = []
        print("| run | drift | FRR % | recall % | image AUROC | recalibrated: FRR % | recall % "
              "| goods' brightness % | detail % | warned |\n|---|---|---|---|---|---|---|---|---|---|")
        for run in args.runs:
            if not (run / "split.json").is_file():
                raise SystemExit(f"{run}: no split.json; give a run folder of prn fit")
            split = Split.load(run / "split.json")
            root = Path(split.root)
            calibration = json.loads((run / "calibration.json").read_text())
            cfg = PRNConfig.load(run / "config.yaml").calibration
            for drift in drifts:
                copy = drifted_copy(root, drift, work)
                out = Path(tmp) / "predict" / run.name / drift.replace(" ", "_")
                row = {"run": str(run), "data": root.name, "drift": drift,
                       **judged(run, split, calibration, cfg, copy, root, out)}
                results.append(row)
                print(f"| {run.name} | {drift} | " + " | ".join(f"{100 * row[k]:.1f}" for k in KEYS)
                      + f" | {look_cells([row])} |", flush=True)
    print("\n| data | drift | runs | FRR % | recall % | image AUROC | recalibrated: FRR % | recall % "
          "| goods' brightness % | detail % | warned |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for data in dict.fromkeys(r["data"] for r in results):
        for drift in drifts:
            rows = [r for r in results if r["data"] == data and r["drift"] == drift]
            print(f"| {data} | {drift} | {len(rows)} | "
                  + " | ".join(f"{100 * np.mean([r[k] for r in rows]):.1f}" for k in KEYS) + f" | {look_cells(rows)} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
