"""What folding the batch norms into their convolutions buys a float32 forward pass (prn.model.folding).

    python benchmarks/fold_speed.py RUN FOLDER [--images 8] [--rounds 12]

Loads the run twice (``prn.deploy.loading.load_model`` with ``fold`` true and false), takes the
first --images images of FOLDER through the one pre-process as one batch, and times the two
models' forward passes alternately (the order swapped every round, two passes a sample, after a
warm-up): median and range of images/s, and the largest differences of scores and maps between
them. Figures depend on the machine's load: say which when you quote them.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from prn.data.io import read_image, require_images
from prn.deploy.loading import load_model
from prn.pipeline import forward_model
from prn.preprocess import resize_image, to_tensor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("folder", type=Path)
    ap.add_argument("--images", type=int, default=8, help="the batch (default 8, predict's)")
    ap.add_argument("--rounds", type=int, default=12)
    args = ap.parse_args()

    models = {"folded": load_model(args.run, device="cpu"), "unfolded": load_model(args.run, device="cpu", fold=False)}
    loaded = models["folded"]
    if loaded.folded == 0:
        raise SystemExit(f"{args.run}: nothing folded (the run infers at precision {loaded.cfg.training.precision})")
    files = require_images(args.folder)[:args.images]
    batch = torch.stack([to_tensor(resize_image(read_image(f), loaded.cfg.model.input_hw)) for f in files])
    run = {k: (lambda m=m: forward_model(m.model, batch, m.device, m.cfg.training.precision)) for k, m in models.items()}
    outputs = {k: fn() for k, fn in run.items()}  # warm-up, and the outputs compared
    rates = {k: [] for k in run}
    for r in range(args.rounds):
        for k in (list(run) if r % 2 else list(run)[::-1]):
            t0 = time.perf_counter()
            run[k]()
            run[k]()
            rates[k].append(2 * len(batch) / (time.perf_counter() - t0))
    (s1, m1), (s0, m0) = outputs["folded"], outputs["unfolded"]
    print(f"{args.run}: {loaded.folded} batch norms folded; batch of {len(batch)} at "
          f"{loaded.cfg.model.input_hw[0]} x {loaded.cfg.model.input_hw[1]}, {torch.get_num_threads()} threads")
    for k, v in rates.items():
        print(f"{k:>9}: median {statistics.median(v):.1f} images/s (range {min(v):.1f}-{max(v):.1f}, {len(v)} samples)")
    print(f"largest difference: scores {abs(s1 - s0).max():.2e}, maps {abs(m1 - m0).max():.2e} "
          f"(map values up to {abs(m0).max():.3f})")


if __name__ == "__main__":
    main()
