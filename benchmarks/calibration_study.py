"""How calibrated thresholds behave on a run's unseen test images.

    python benchmarks/calibration_study.py RUN [RUN ...] [--target-fpr 0.01] [--work /tmp/cal]
    python benchmarks/calibration_study.py RUN [RUN ...] --in-place   # reuse RUN/test_out

Each run folder is copied (the original is left as it was; ``--in-place`` works on the folders
themselves and reuses a ``test_out`` already there), calibrated on its held-out good training
images (``prn.deploy.calibrate.calibrate_run``, as ``prn fit`` does at its end), then tested
(``prn.api.test`` into ``test_out``). Prints one markdown row per run (held-out good images,
threshold, false rejects among the test's good parts, misses among its defects, image AUROC),
then, for each way of setting the threshold from the same held-out scores (the fitted tails of
``image_threshold`` and the bare largest held-out score), the false rejects and misses summed
over the runs. The test images only measure the rules; nothing is fitted to them.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from prn import api
from prn.deploy.calibrate import TAILS, calibrate_run, image_threshold
from prn.checkpoint import load_checkpoint
from prn.registry import score_bound


def test_scores(run: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(run / "test_out" / "predictions" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    scores = {label: np.array([float(r["score"]) for r in rows if r["label"] == label]) for label in "01"}
    return scores["0"], scores["1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--target-fpr", type=float, default=None)
    ap.add_argument("--work", type=Path, help="where the copies go (default: a temp folder)")
    ap.add_argument("--in-place", action="store_true", help="calibrate the run folders themselves")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prn_calibration_"))
    totals = {rule: [0, 0, 0, 0] for rule in (*TAILS, "largest")}
    print("| run | held-out good | threshold | false rejects (test good) | misses (test defects) | image AUROC |")
    print("|---|---|---|---|---|---|")
    for i, run in enumerate(args.runs):
        copy = run if args.in_place else work / f"{i:02d}_{run.name}"
        if not copy.exists():
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("predictions", "images", "best.pt"))
        cal = calibrate_run(copy, target_fpr=args.target_fpr)
        if (copy / "test_out" / "results.json").is_file() and args.in_place:
            m = json.loads((copy / "test_out" / "results.json").read_text())["mean"]
        else:
            m = api.test(copy, out_dir=copy / "test_out", overlays=0, progress=False)
        good, bad = test_scores(copy)
        t = cal["image_threshold"]
        print(f"| {run} | {cal['n_normal']} | {t:.4g} | {int((good >= t).sum())}/{good.size} "
              f"({100 * np.mean(good >= t):.1f} %) | {int((bad < t).sum())}/{bad.size} "
              f"({100 * np.mean(bad < t):.1f} %) | {100 * m['image_auroc']:.1f} |", flush=True)
        held_out = np.array(cal["normal_scores"])
        bound = score_bound(load_checkpoint(copy)["model"])  # the kind's, as fit's calibration takes it
        for rule, acc in totals.items():
            if rule == "largest":
                thr = float(np.nextafter(held_out.max(), np.inf))
            else:
                thr = image_threshold(held_out, cal["target_fpr"], rule, bound)[0]
            acc[0] += int((good >= thr).sum()); acc[1] += good.size
            acc[2] += int((bad < thr).sum()); acc[3] += bad.size
    print("\n| rule | false rejects (test good) | misses (test defects) |\n|---|---|---|")
    for rule, (fr, ng, ms, nb) in totals.items():
        print(f"| {rule} | {fr}/{ng} ({100 * fr / ng:.2f} %) | {ms}/{nb} ({100 * ms / nb:.1f} %) |")


if __name__ == "__main__":
    main()
