"""Demo metrics under bf16 against float32 on the CPU, short schedule.

    OMP_NUM_THREADS=1 python benchmarks/precision_demo.py /tmp/precision_demo

The demo's data and config (`prn demo`: 128 px, EfficientNet-Lite0, batch 16) for 2 epochs of 10
steps: trained and tested in float32 with seeds 0 and 1 (the spread between seeds is the noise
to compare with) and in bf16 with seed 0; then the float32 seed-0 weights tested again with bf16
inference, and how far its maps and scores move. Prints one line per run; writes
demo_precision.json in the output folder.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from prn import api
from prn.data.demo import make_demo_dataset
from prn.data.split import Split
from prn.demo import demo_config

KEYS = ("image_auroc", "pixel_auroc", "pro", "pixel_ap")


def main(out: Path) -> dict:
    make_demo_dataset(out / "data", seed=0)
    rows = {}
    for name, precision, seed in (("fp32 seed 0", "32", 0), ("bf16 seed 0", "bf16", 0), ("fp32 seed 1", "32", 1)):
        cfg = demo_config(out).replace(precision=precision, seed=seed, device="cpu", epochs=2, steps_per_epoch=10)
        t0 = time.perf_counter()
        run = api.fit(cfg, run_dir=api.new_run_dir(cfg, name.replace(" ", "_")), progress=False)
        fit_seconds = round(time.perf_counter() - t0, 1)
        metrics = api.test(run, progress=False, overlays=0)
        rows[name] = {**{k: round(100 * metrics[k], 2) for k in KEYS}, "fit_seconds": fit_seconds, "run": str(run)}
        print(name, rows[name], flush=True)
    run = Path(rows["fp32 seed 0"]["run"])
    model, cfg = api.load_model(run, device="cpu")
    test = Split.load(run / "split.json").test
    full_metrics, full = api.evaluate(model, cfg, test)
    half_metrics, half = api.evaluate(model, cfg.replace(precision="bf16"), test)
    rows["fp32 seed 0 weights, bf16 inference"] = {
        **{k: round(100 * half_metrics[k], 2) for k in KEYS},
        "max_map_difference": round(float(np.abs(full.maps - half.maps).max()), 4),
        "mean_map_difference": round(float(np.abs(full.maps - half.maps).mean()), 5),
        "max_score_difference": round(float(np.abs(full.scores - half.scores).max()), 5),
        "score_spearman": round(float(spearmanr(full.scores, half.scores).correlation), 4)}
    print("fp32 seed 0 weights, bf16 inference", rows["fp32 seed 0 weights, bf16 inference"])
    (out / "demo_precision.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/precision_demo"))
