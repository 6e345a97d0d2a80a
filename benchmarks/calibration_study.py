"""How calibrated thresholds behave on a run's unseen test images (issue 10).

    python benchmarks/calibration_study.py RUN [RUN ...] [--target-fpr 0.01] [--work /tmp/cal]

Each run folder is copied (the original is left as it was), calibrated on its held-out good
training images (``prn.deploy.calibrate.calibrate_run``, as ``prn fit`` does at its end), then
tested (``prn.api.test``). Prints one markdown row per run: held-out good images, threshold,
false rejects among the test's good parts, misses among its defects, image AUROC.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from prn import api
from prn.deploy.calibrate import calibrate_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--target-fpr", type=float, default=None)
    ap.add_argument("--work", type=Path, help="where the copies go (default: a temp folder)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="prn_calibration_"))
    print("| run | held-out good | threshold | false rejects (test good) | misses (test defects) | image AUROC |")
    print("|---|---|---|---|---|---|")
    for i, run in enumerate(args.runs):
        copy = work / f"{i:02d}_{run.name}"
        if not copy.exists():
            shutil.copytree(run, copy, ignore=shutil.ignore_patterns("predictions", "images", "best.pt"))
        cal = calibrate_run(copy, target_fpr=args.target_fpr)
        m = api.test(copy, out_dir=copy / "test_out", overlays=0, progress=False)
        good = m["n_test"] - m["n_test_anomalous"]
        print(f"| {run} | {cal['n_normal']} | {cal['image_threshold']:.4g} | {m['false_rejects']}/{good} "
              f"({100 * m['false_reject_rate']:.1f} %) | {m['misses']}/{m['n_test_anomalous']} "
              f"({100 * m['miss_rate']:.1f} %) | {100 * m['image_auroc']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
