"""What more good parts do to the threshold (`prn calibrate RUN --good-images DIR`), judged on
good parts that set nothing.

    python benchmarks/added_goods.py RUN [RUN ...] [--draws 20] [--shares 0.25 0.5]

Each run must be fitted and tested (``calibration.json``: the held-out good images' scores;
``predictions/scores.csv``: the test split's). The test's good parts stand in for good parts
collected on the line after the fit: in each draw a share of them (``--shares``) is added to the
held-out scores and the threshold set again by the run's own rule (``image_threshold`` at its
target rate, with its tail, under PRN's bound of 1); the test's other good parts and all its
defects judge it: the realised false-reject rate (FRR), the recall, and the recall an oracle
threshold (taken on those same parts) gets at that FRR. The held-out fold alone is judged on the
same parts in the same draw, so each pair of rows compares like with like. Nothing is written:
the runs keep their thresholds.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np

from prn.config import PRNConfig
from prn.deploy.calibrate import image_threshold
from prn.metrics import oracle_threshold, recall_at
from prn.registry import score_bound


def run_scores(run: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, PRNConfig]:
    """The held-out good scores, the test's labels and scores, and the run's config."""
    cal = json.loads((run / "calibration.json").read_text())
    with open(run / "predictions" / "scores.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] in ("0", "1") and r["score"]]
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["score"]) for r in rows])
    return np.array(cal["normal_scores"]), labels, scores, PRNConfig.load(run / "config.yaml")


def judge(t: float, good: np.ndarray, bad: np.ndarray) -> tuple[float, float, float]:
    """FRR on ``good``, recall on ``bad``, and the oracle's recall at that FRR."""
    y, s = np.r_[np.zeros(len(good), int), np.ones(len(bad), int)], np.r_[good, bad]
    frr = float(np.mean(good >= t))
    return frr, float(np.mean(bad >= t)), float(recall_at(y, s, oracle_threshold(y, s, frr)))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5])
    args = ap.parse_args(argv)
    if not all(0 < share < 1 for share in args.shares):
        ap.error("each share must be between 0 and 1")
    rows: dict[tuple[str, str], list] = {}
    for run in args.runs:
        if not (run / "calibration.json").is_file() or not (run / "predictions" / "scores.csv").is_file():
            ap.error(f"{run}: needs calibration.json and predictions/scores.csv (prn fit --test, or prn test RUN)")
        fold, labels, scores, cfg = run_scores(run)
        goods, bad = scores[labels == 0], scores[labels == 1]
        rule = dict(target_fpr=cfg.calibration.target_fpr, tail=cfg.calibration.calibration_tail,
                    score_bound=score_bound("prn"))
        alone = image_threshold(fold, **rule)[0]
        rng = np.random.default_rng(0)
        for share in args.shares:
            n = int(round(share * len(goods)))
            for _ in range(args.draws):
                perm = rng.permutation(len(goods))
                added, rest = goods[perm[:n]], goods[perm[n:]]
                both = image_threshold(np.r_[fold, added], **rule)[0]
                for name in (run.name, "all runs"):
                    rows.setdefault((name, f"{share:.0%}", "held-out fold alone"), []).append(
                        (len(fold), alone, *judge(alone, rest, bad)))
                    rows.setdefault((name, f"{share:.0%}", "fold + added"), []).append(
                        (len(fold) + n, both, *judge(both, rest, bad)))
    print("| run | test goods added | threshold set on | good parts (mean) | threshold (mean) | mean FRR % | "
          "worst FRR % | mean recall % | oracle recall at FRR % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, share, on), v in sorted(rows.items(), key=lambda kv: (kv[0][0] == "all runs", kv[0])):
        v = np.array(v)
        print(f"| {name} | {share} | {on} | {v[:, 0].mean():.0f} | {v[:, 1].mean():.4f} | {100 * v[:, 2].mean():.2f} | "
              f"{100 * v[:, 2].max():.1f} | {100 * v[:, 3].mean():.1f} | {100 * v[:, 4].mean():.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
