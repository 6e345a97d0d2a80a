"""Threshold rules judged on unseen good parts: target vs realised false rejects vs the oracle.

    python benchmarks/image_score_study.py RUN [RUN ...]     # writes RUN/study/outputs.npz once
    python benchmarks/threshold_rules.py RUN [RUN ...] [--target-fpr 0.01] [--pool]

For each run, the image score (mean of the map's top-k pixels, k from the run's config) of its
held-out good images sets a threshold by each rule of ``prn.deploy.calibrate.image_threshold``
(gumbel, gumbel_logit, normal, conformal) and by the bare largest held-out score; the test split then gives the
realised false-reject rate (FRR) on its good parts, the recall on its defects, and the recall an
oracle threshold (taken on the test scores) gets at that same realised FRR. One markdown row per
run and rule, then the means and the worst FRR over the runs.

``--pool`` asks what a larger held-out fold would do: the held-out and test good images are pooled
and split at random (20 draws) into a fold of the held-out size times 1, 2 and 4 and the rest,
which judges the rule (exchangeable good parts: the shift between a run's held-out and test goods
is averaged out). The test defects are the same in every draw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml

from prn.deploy.calibrate import TAILS, image_threshold
from prn.metrics import oracle_threshold, recall_at
from prn.registry import score_bound


def top_k_of(run: Path) -> int:
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return int(cfg.get("model", cfg).get("top_k", 100))


def thresholds(val: np.ndarray, target: float, bound: float | None = score_bound("prn")) -> dict[str, float]:
    """Each rule's threshold; ``bound``: the largest score the model can give, PRN's by default
    (these runs are PRN's), taken from prn.registry as fit's calibration takes it."""
    out = {tail: image_threshold(val, target, tail, score_bound=bound)[0] for tail in TAILS}
    out["largest"] = float(np.nextafter(val.max(), np.inf))
    return out


def judge(t: float, good: np.ndarray, y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    frr = float(np.mean(good >= t))
    return frr, float(np.mean(s[y == 1] >= t)), float(recall_at(y, s, oracle_threshold(y, s, frr)))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--pool", action="store_true")
    args = ap.parse_args(argv)
    rows: dict[str, list] = {}
    print("| run | held-out goods | rule | threshold | FRR % | recall % | oracle recall at FRR % |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        if not (run / "study" / "outputs.npz").is_file():
            ap.error(f"{run}: no study/outputs.npz; run python benchmarks/image_score_study.py {run} first")
        d = dict(np.load(run / "study" / "outputs.npz"))
        score = d["prn"][:, :top_k_of(run)].mean(1)
        val = score[(d["part"] == "val") & (d["label"] == 0)]
        test = d["part"] == "test"
        y, s = d["label"][test], score[test]
        if not args.pool:
            for rule, t in thresholds(val, args.target_fpr).items():
                frr, rec, orc = judge(t, s[y == 0], y, s)
                rows.setdefault((rule, "held out"), []).append((frr, rec, orc))
                print(f"| {run.name} | {len(val)} | {rule} | {t:.4f} | {100 * frr:.1f} | {100 * rec:.1f} | {100 * orc:.1f} |")
            continue
        goods, bad = np.concatenate([val, s[y == 0]]), s[y == 1]
        rng = np.random.default_rng(0)
        for factor in (1, 2, 4):
            n = len(val) * factor
            if n >= len(goods) - 10:
                continue
            for _ in range(20):
                perm = rng.permutation(len(goods))
                fold, rest = goods[perm[:n]], goods[perm[n:]]
                yy = np.r_[np.zeros(len(rest), int), np.ones(len(bad), int)]
                ss = np.r_[rest, bad]
                for rule, t in thresholds(fold, args.target_fpr).items():
                    rows.setdefault((rule, f"x{factor}"), []).append(judge(t, rest, yy, ss))
    print("\n| rule | fold | runs x draws | mean FRR % | worst FRR % | mean recall % | oracle recall at FRR % |")
    print("|---|---|---|---|---|---|---|")
    for (rule, fold), v in sorted(rows.items(), key=lambda kv: (str(kv[0][1]), kv[0][0])):
        v = np.array(v)
        print(f"| {rule} | {fold} | {len(v)} | {100 * v[:, 0].mean():.2f} | {100 * v[:, 0].max():.1f} | "
              f"{100 * v[:, 1].mean():.1f} | {100 * v[:, 2].mean():.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
