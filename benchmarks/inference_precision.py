"""Does a float32-trained run decide the same when it infers in bfloat16?

For each run: its test split scored twice by the same weights, at the run's own precision and
under bfloat16 autocast (how test, predict and serve run it after ``prn calibrate RUN --precision
bf16``), then the four metrics, image AUROC, and the false-reject rate and recall at the run's
calibrated threshold (calibrated at the run's own precision) for each, and the largest change of
an image score. Nothing is chosen here; figures go to BENCHMARKS.md with the machine and load.

    python benchmarks/inference_precision.py RUN [RUN ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from prn import api
from prn.data.split import Split
from prn.deploy.loading import load_model
from prn.metrics import recall_at


def study(run: Path) -> dict:
    loaded = load_model(run, device="cpu")
    split = Split.load(run / "split.json")
    threshold = loaded.calibration["image_threshold"]
    out = {"run": str(run), "threshold": threshold}
    scores = {}
    for precision in (loaded.cfg.training.precision, "bf16"):
        cfg = loaded.cfg.replace(precision=precision)
        t0 = time.perf_counter()
        metrics, preds = api.evaluate(loaded.model, cfg, split.test)
        y = preds.labels.astype(bool)
        scores[precision] = preds.scores
        out[precision] = {k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pro", "pixel_ap")} | {
            "false_reject_rate": float((preds.scores[~y] >= threshold).mean()),
            "recall": recall_at(y, preds.scores, threshold), "seconds": time.perf_counter() - t0}
    a, b = scores.values()
    out["max_score_change"] = float(np.abs(a - b).max())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print("| run | precision | I | P | O | A | FRR % | recall % | s | max score change |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        r = study(run)
        rows.append(r)
        for precision in [k for k in r if isinstance(r[k], dict)]:
            m = r[precision]
            print(f"| {run.name} | {precision} | " + " | ".join(f"{100 * m[k]:.1f}" for k in (
                "image_auroc", "pixel_auroc", "pro", "pixel_ap", "false_reject_rate", "recall"))
                  + f" | {m['seconds']:.0f} | {r['max_score_change']:.4f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
