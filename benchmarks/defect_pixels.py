"""How often the calibrated threshold stops a defect, by its size in pixels of the model's input.

    python benchmarks/defect_pixels.py RUN [RUN ...] [--bins 16 32 64 128]

``prn test``'s per-size table bins defects by the share of the photo they cover; what the network
sees is the photo resized to its input, so this bins them by the pixels of their mask at the
run's input size (resized as training and test resize masks: nearest neighbour). Each run folder
needs ``split.json``, ``config.yaml``, ``calibration.json`` and ``predictions/scores.csv`` (written by
``prn fit --test`` or ``prn test``). One markdown row per bin over all the runs given: defects,
stopped, share stopped. Nothing is chosen here; README's "Small defects" quotes it.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from prn.api import split_root
from prn.config import PRNConfig
from prn.data.datasets import load_sample
from prn.data.split import Split
from prn.report import shown_path


def sizes_and_stops(run: Path) -> list[tuple[int, bool]]:
    """(mask pixels at the input, stopped at the calibrated threshold) of each defect with a mask."""
    cfg = PRNConfig.load(run / "config.yaml")
    threshold = json.loads((run / "calibration.json").read_text())["image_threshold"]
    with open(run / "predictions" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    split = Split.load(run / "split.json")
    defects = [s for s in split.test if s.label == 1 and s.mask_path is not None]
    scored = {r["path"]: float(r["score"]) for r in rows}
    out = []
    for sample in defects:
        key = shown_path(Path(sample.image_path), split_root(cfg))  # as the test wrote it
        if key not in scored:
            raise SystemExit(f"{run / 'predictions' / 'scores.csv'}: no row for {key}; test the run again (prn test)")
        _, mask = load_sample(sample, cfg.model.input_hw, cfg.data.max_image_pixels)
        out.append((int(mask.sum()), scored[key] >= threshold))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--bins", nargs="+", type=int, default=[16, 32, 64, 128], help="upper edges, pixels")
    args = p.parse_args(argv)
    found = [pair for run in args.runs for pair in sizes_and_stops(run)]
    edges = [0, *sorted(args.bins), None]
    print("| input pixels | defects | stopped | share % |")
    print("|---|---|---|---|")
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = [stop for px, stop in found if px >= lo and (hi is None or px < hi)]
        label = f"{lo}-{hi}" if hi is not None else f">= {lo}"
        share = f"{100 * sum(inside) / len(inside):.1f}" if inside else "-"
        print(f"| {label} | {len(inside)} | {sum(inside)} | {share} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
