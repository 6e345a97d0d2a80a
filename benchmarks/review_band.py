"""What a review band would do on trained runs, from their stored scores (no model is run).

    python benchmarks/review_band.py RUN [RUN ...] [--rates 0.02 0.05 0.1] [--json out.json]

For each run the held-out good images' scores (``calibration.json``'s ``normal_scores``, the score
the run decides by, a kept memory of the seen defects included) set the band's lower edge at each
rate as ``prn calibrate RUN --review-fpr R`` would (``prn.deploy.calibrate.calibrate`` with the
run's target rate and tail); the test split's scores and labels (``predictions/scores.csv``, which
``prn test`` writes) are then judged by the run's post-process with that band
(``prn.deploy.calibrate.review_rates``). Per rate: the good parts rejected and passed to review,
and the defective parts stopped, and stopped or passed to review, as shares of the test split,
per run and as the mean over the runs; then the counts pooled over the runs. Nothing is chosen
here: the band is off unless a user opens it.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

from prn.config import PRNConfig
from prn.deploy.calibrate import calibrate, rates_at, review_rates
from prn.postprocess import Postprocess
from prn.registry import score_bound


def test_scores(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of the run's test split, from the scores.csv its last ``prn test`` wrote."""
    with (run / "predictions" / "scores.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if not r["error"]]
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows])


def band(run: Path, rate: float) -> dict:
    stored = json.loads((run / "calibration.json").read_text())
    cfg = PRNConfig.load(run / "config.yaml").calibration
    normal = np.asarray(stored["normal_scores"])
    cal = calibrate(normal, np.zeros((normal.size, 1, 1)), target_fpr=stored["target_fpr"],
                    tail=cfg.calibration_tail, score_bound=score_bound("prn"), review_fpr=rate)
    if abs(cal["image_threshold"] - stored["image_threshold"]) > 1e-9 * max(1.0, abs(cal["image_threshold"])):
        raise SystemExit(f"{run}: the stored scores give threshold {cal['image_threshold']:.6g}, "
                         f"not the run's {stored['image_threshold']:.6g}; calibrate and test the run again")
    labels, scores = test_scores(run)
    post = Postprocess({**stored, "review_threshold": cal["review_threshold"]})
    out = {**rates_at(labels, scores, post.threshold), **review_rates(labels, scores, post)}
    out.update(n_good=int((labels == 0).sum()), n_defective=int(labels.sum()))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--rates", nargs="+", type=float, default=[0.02, 0.05, 0.1])
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    table = {rate: {str(run): band(run, rate) for run in args.runs} for rate in args.rates}
    print("| review rate | run | FRR | to review (good) | recall | recall with review |")
    print("|---|---|---|---|---|---|")
    for rate, per_run in table.items():
        for run, r in per_run.items():
            print(f"| {100 * rate:g} % | {run} | {100 * r['false_reject_rate']:.1f} | {100 * r['review_rate']:.1f} "
                  f"| {100 * r['recall']:.1f} | {100 * r['recall_with_review']:.1f} |")
        mean = {k: np.mean([r[k] for r in per_run.values()])
                for k in ("false_reject_rate", "review_rate", "recall", "recall_with_review")}
        total = {k: sum(r[k] for r in per_run.values())
                 for k in ("false_rejects", "good_reviewed", "misses", "defective_reviewed", "n_good", "n_defective")}
        print(f"| {100 * rate:g} % | mean of {len(per_run)} | {100 * mean['false_reject_rate']:.1f} | "
              f"{100 * mean['review_rate']:.1f} | {100 * mean['recall']:.1f} | "
              f"{100 * mean['recall_with_review']:.1f} |")
        stopped = total["n_defective"] - total["misses"]
        print(f"| {100 * rate:g} % | pooled | {total['false_rejects']} of {total['n_good']} | {total['good_reviewed']} "
              f"| {stopped} of {total['n_defective']} | {stopped + total['defective_reviewed']} |")
    if args.json:
        args.json.write_text(json.dumps({str(k): v for k, v in table.items()}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
