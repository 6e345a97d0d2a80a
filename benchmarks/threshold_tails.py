"""Calibration rules judged on many runs at once, from the files every run already has.

    python benchmarks/threshold_tails.py FOLDER [FOLDER ...] [--target-fpr 0.01] [--draws 10]

Every PRN run folder under the arguments that holds ``calibration.json`` (its held-out good
images' scores, ``normal_scores``) and ``predictions/scores.csv`` (written by ``prn fit --test`` or
``prn test``) is judged: each rule of ``prn.deploy.calibrate.image_threshold`` (and the bare largest
held-out score) sets a threshold on the held-out scores, and the run's test split gives the
realised false-reject rate (FRR) on its good parts and the recall on its defects. "as split": the
run's own held-out fold; "pooled": held-out and test good parts pooled and redrawn ``--draws``
times into a fold of the same size and the rest (exchangeable good parts, no shift between fold
and test). One markdown row per data set (the config's data root), evaluation and rule: runs (x
draws), mean FRR, the share of runs whose FRR passed twice the target, the worst FRR, mean recall.
Runs of one split under different settings are not independent samples; the table says how many
runs it pooled. Unlike ``threshold_rules.py`` it needs no maps (no ``image_score_study.py`` first).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import yaml

from threshold_rules import thresholds  # benchmarks/ is the script's folder, so on sys.path


def test_labels_and_scores(run: Path) -> tuple[np.ndarray, np.ndarray]:
    """(labels, scores) of a run's labelled test split, from ``predictions/scores.csv`` (rows with
    a label and a score: unreadable images have neither)."""
    with (run / "predictions" / "scores.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("label") in ("0", "1") and r.get("score")]
    return np.array([int(r["label"]) for r in rows]), np.array([float(r["score"]) for r in rows])


def runs_under(folders: list[Path]):
    """(data set name, held-out good scores, test labels, test scores) of each PRN run found."""
    for folder in folders:
        for cal in sorted(folder.rglob("calibration.json")):
            run = cal.parent
            scores_csv = run / "predictions" / "scores.csv"
            config = run / "config.yaml"
            if not scores_csv.is_file() or not config.is_file():
                continue
            cfg = yaml.safe_load(config.read_text())
            held_out = np.asarray((json.loads(cal.read_text()) or {}).get("normal_scores") or [], float)
            if len(held_out) < 2 or cfg.get("model", {}).get("image_score", "top_k") == "head":
                continue  # nothing to fit, or the image head's scores crowd at 1
            y, s = test_labels_and_scores(run)
            if (y == 0).any() and (y == 1).any():
                yield Path(cfg["data"]["root"]).name or "data", held_out, y, s


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--draws", type=int, default=10)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows: dict[tuple[str, str, str], list] = {}
    for data, held_out, y, s in runs_under(args.folders):
        good, bad = s[y == 0], s[y == 1]
        for rule, t in thresholds(held_out, args.target_fpr).items():
            rows.setdefault((data, "as split", rule), []).append((np.mean(good >= t), np.mean(bad >= t)))
        pool = np.concatenate([held_out, good])
        for _ in range(args.draws):
            perm = rng.permutation(len(pool))
            fold, rest = pool[perm[:len(held_out)]], pool[perm[len(held_out):]]
            for rule, t in thresholds(fold, args.target_fpr).items():
                rows.setdefault((data, "pooled", rule), []).append((np.mean(rest >= t), np.mean(bad >= t)))
    print(f"| data | evaluation | rule | runs | mean FRR % | FRR > {200 * args.target_fpr:g} % | worst FRR % | mean recall % |")
    print("|---|---|---|---|---|---|---|---|")
    for (data, evaluation, rule), v in sorted(rows.items()):
        v = np.array(v)
        print(f"| {data} | {evaluation} | {rule} | {len(v)} | {100 * v[:, 0].mean():.2f} | "
              f"{100 * np.mean(v[:, 0] > 2 * args.target_fpr):.0f} % | {100 * v[:, 0].max():.1f} | {100 * v[:, 1].mean():.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
