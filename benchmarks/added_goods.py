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
import json
import sys
from pathlib import Path

import numpy as np

from prn.config import PRNConfig
from prn.deploy.calibrate import image_threshold
from prn.registry import score_bound
# benchmarks/ is the script's folder, so on sys.path
from threshold_rules import judge  # (FRR, recall, the oracle's recall at that FRR)
from threshold_tails import test_labels_and_scores


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
        fold = np.array(json.loads((run / "calibration.json").read_text())["normal_scores"])
        labels, scores = test_labels_and_scores(run)
        cfg = PRNConfig.load(run / "config.yaml")
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
                y, s = np.r_[np.zeros(len(rest), int), np.ones(len(bad), int)], np.r_[rest, bad]
                judged = {"held-out fold alone": (len(fold), alone, *judge(alone, rest, y, s)),
                          "fold + added": (len(fold) + n, both, *judge(both, rest, y, s))}
                for name in (run.name, "all runs"):
                    for on, row in judged.items():
                        rows.setdefault((name, f"{share:.0%}", on), []).append(row)
    print("| run | test goods added | threshold set on | good parts (mean) | threshold (mean) | mean FRR % | "
          "worst FRR % | mean recall % | oracle recall at FRR % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for (name, share, on), v in sorted(rows.items(), key=lambda kv: (kv[0][0] == "all runs", kv[0])):
        v = np.array(v)
        print(f"| {name} | {share} | {on} | {v[:, 0].mean():.0f} | {v[:, 1].mean():.4f} | {100 * v[:, 2].mean():.2f} | "
              f"{100 * v[:, 2].max():.1f} | {100 * v[:, 3].mean():.1f} | {100 * v[:, 4].mean():.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
